"""Ray Train's failure policy, as shardrun gives it: a deterministic worker error ends the run at once, every
other failure keeps Ray's own rules (failure.max_failures)."""

import pytest
from ray.train import FailureConfig
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from shardrun.cluster.failures import (
    FailurePolicy,
    RepeatCounter,
    deterministic_error,
    deterministic_errors_not_retried,
)
from shardrun.errors import RepeatedFailure, TrainingDiverged, UserError


def failed(*errors: BaseException) -> WorkerGroupError:
    """A worker group failure as Ray Train reports it: each rank's exception wrapped with its traceback."""
    return WorkerGroupError("worker errors", {r: UserExceptionWithTraceback(e, "Traceback ...") for r, e in
                                             enumerate(errors)})


@pytest.mark.parametrize("error", [UserError("part-003.parquet row group 7: cannot be read"),
                                   TrainingDiverged("step 5: the loss or the gradients are not finite"),
                                   RepeatedFailure("rank 1 failed after step 3 in 3 attempts ...")])
def test_a_deterministic_error_is_never_retried(error):
    policy = FailurePolicy(FailureConfig(max_failures=-1))
    group = failed(RuntimeError("gloo: connection reset by peer"), error)  # a peer's collateral error first
    assert policy.make_decision(group) is FailureDecision.RAISE
    assert deterministic_error(group) is group.worker_failures[1]._base_exc


def test_other_failures_keep_ray_trains_retries_and_each_decision_is_said(capsys):
    policy = FailurePolicy(FailureConfig(max_failures=1))
    crash = failed(RuntimeError("CUDA error: an illegal memory access"))
    assert policy.make_decision(crash) is FailureDecision.RETRY
    assert policy.make_decision(crash) is FailureDecision.RAISE  # max_failures: 1
    assert capsys.readouterr().err.splitlines() == [
        "[shardrun] the worker group ended: a worker failure (counted against failure.max_failures); Ray Train "
        "restarts it",
        "[shardrun] the worker group ended: a worker failure (counted against failure.max_failures); no restarts "
        "are left: the run ends"]
    assert deterministic_error(crash) is None and deterministic_error(ValueError("driver")) is None


def test_fit_builds_shardruns_policy_inside_the_block_only():
    from ray.train.v2.api import data_parallel_trainer

    original = data_parallel_trainer.create_failure_policy
    with deterministic_errors_not_retried():
        assert isinstance(data_parallel_trainer.create_failure_policy(FailureConfig()), FailurePolicy)
    assert data_parallel_trainer.create_failure_policy is original


def test_the_same_error_at_the_same_step_is_repeated_at_the_limit_and_numbers_do_not_tell_attempts_apart():
    counter = RepeatCounter(3)
    gloo = "Connection closed by peer [10.0.0.{n}]:{port}"
    assert counter.failed(1, 40, "RuntimeError", gloo.format(n=4, port=51234)) is None
    assert counter.failed(1, 40, "RuntimeError", gloo.format(n=7, port=40001)) is None
    assert counter.failed(1, 41, "RuntimeError", gloo.format(n=7, port=40001)) is None  # another step
    assert counter.failed(0, 40, "RuntimeError", gloo.format(n=7, port=40001)) is None  # another rank
    assert counter.failed(1, 40, "ValueError", gloo.format(n=7, port=40001)) is None  # another error
    said = counter.failed(1, 40, "RuntimeError", gloo.format(n=9, port=40002) + "\ntraceback ...")
    assert said.startswith("rank 1 failed after step 40 in 3 attempts of the worker group with the same error, "
                           "RuntimeError: Connection closed by peer [10.0.0.9]:40002; a restart would meet it")
    assert "failure.same_failure_limit: 3" in said
    unlimited = RepeatCounter(0)
    assert all(unlimited.failed(0, None, "OSError", "no such blob") is None for _ in range(10))
    at_once = RepeatCounter(1).failed(0, None, "OSError", "GET abfs://c@a/x?sv=1&sig=SECRET failed")
    assert "while starting" in at_once and "SECRET" not in at_once
