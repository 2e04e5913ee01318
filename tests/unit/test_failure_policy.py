"""Ray Train's failure policy, as shardrun gives it: a deterministic worker error ends the run at once, every
other failure keeps Ray's own rules (failure.max_failures)."""

import pytest
from ray.train import FailureConfig
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from shardrun.cluster.failures import FailurePolicy, deterministic_error, deterministic_errors_not_retried
from shardrun.errors import TrainingDiverged, UserError


def failed(*errors: BaseException) -> WorkerGroupError:
    """A worker group failure as Ray Train reports it: each rank's exception wrapped with its traceback."""
    return WorkerGroupError("worker errors", {r: UserExceptionWithTraceback(e, "Traceback ...") for r, e in
                                             enumerate(errors)})


@pytest.mark.parametrize("error", [UserError("part-003.parquet row group 7: cannot be read"),
                                   TrainingDiverged("step 5: the loss or the gradients are not finite")])
def test_a_deterministic_error_is_never_retried(error):
    policy = FailurePolicy(FailureConfig(max_failures=-1))
    group = failed(RuntimeError("gloo: connection reset by peer"), error)  # a peer's collateral error first
    assert policy.make_decision(group) is FailureDecision.RAISE
    assert deterministic_error(group) is group.worker_failures[1]._base_exc


def test_other_failures_keep_ray_trains_retries():
    policy = FailurePolicy(FailureConfig(max_failures=1))
    crash = failed(RuntimeError("CUDA error: an illegal memory access"))
    assert policy.make_decision(crash) is FailureDecision.RETRY
    assert policy.make_decision(crash) is FailureDecision.RAISE  # max_failures: 1
    assert deterministic_error(crash) is None and deterministic_error(ValueError("driver")) is None


def test_fit_builds_shardruns_policy_inside_the_block_only():
    from ray.train.v2.api import data_parallel_trainer

    original = data_parallel_trainer.create_failure_policy
    with deterministic_errors_not_retried():
        assert isinstance(data_parallel_trainer.create_failure_policy(FailureConfig()), FailurePolicy)
    assert data_parallel_trainer.create_failure_policy is original
