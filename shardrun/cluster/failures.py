"""Which worker failures Ray Train may retry. A deterministic error (bad data met mid-run, the non-finite
policy's stop, a changed data set on resume) fails the same way after every restart: with
failure.max_failures -1 it would rebuild the model and reload the checkpoint forever, on machines paid by the
hour. Such an error ends the run at once, with its own message."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from shardrun.errors import TrainingDiverged, UserError

DETERMINISTIC = (UserError, TrainingDiverged)


def deterministic_error(error: BaseException) -> BaseException | None:
    """The first worker's deterministic error inside a Ray Train failure, or None."""
    failures = error.worker_failures.values() if isinstance(error, WorkerGroupError) else ()
    for failure in failures:
        cause = getattr(failure, "_base_exc", failure)  # Ray Train wraps it with its traceback
        if isinstance(cause, DETERMINISTIC):
            return cause
    return None


class FailurePolicy(DefaultFailurePolicy):
    """Ray Train's own policy (failure.max_failures, max_preemptions), except that a deterministic error is
    never retried."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if deterministic_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


@contextlib.contextmanager
def deterministic_errors_not_retried() -> Iterator[None]:
    """Inside the block, TorchTrainer.fit() builds shardrun's FailurePolicy. Ray Train takes no policy from
    its users: fit() looks its factory up in its module, where this puts ours. If Ray moves it, runs keep
    Ray's policy (they only lose this shortcut)."""
    from ray.train.v2.api import data_parallel_trainer as module

    original = getattr(module, "create_failure_policy", None)
    if original is None:
        yield
        return
    module.create_failure_policy = FailurePolicy
    try:
        yield
    finally:
        module.create_failure_policy = original
