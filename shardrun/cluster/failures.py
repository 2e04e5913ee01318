"""Which worker failures Ray Train may retry. A deterministic error (bad data met mid-run, the non-finite
policy's stop, a changed data set on resume) fails the same way after every restart: with
failure.max_failures -1 it would rebuild the model and reload the checkpoint forever, on machines paid by the
hour. Such an error ends the run at once, with its own message; so does any error that came back at the same
step in failure.same_failure_limit attempts (RepeatCounter, kept by the driver's event channel)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from shardrun import fs
from shardrun.errors import RepeatedFailure, TrainingDiverged, UserError, first_line, redact

DETERMINISTIC = (UserError, TrainingDiverged, RepeatedFailure)


def worker_errors(error: BaseException) -> str | None:
    """`rank 1: RuntimeError: ...; rank 0: ...`: each failed worker's error in its first line, or None when
    `error` is no worker group's failure."""
    if not isinstance(error, WorkerGroupError):
        return None
    said = []
    for rank, failure in sorted(error.worker_failures.items()):
        cause = getattr(failure, "_base_exc", failure)
        first = first_line(str(cause))[:300]
        said.append(f"rank {rank}: {type(cause).__name__}: {first}")
    return redact("; ".join(said)) if said else None


def deterministic_error(error: BaseException) -> BaseException | None:
    """The first worker's deterministic error inside a Ray Train failure, or None."""
    failures = error.worker_failures.values() if isinstance(error, WorkerGroupError) else ()
    for failure in failures:
        cause = getattr(failure, "_base_exc", failure)  # Ray Train wraps it with its traceback
        if isinstance(cause, DETERMINISTIC):
            return cause
    return None


def signature(kind: str, message: str) -> str:
    """An error's type and first line with its numbers masked (ports, addresses, pids and timings differ
    from one attempt to the next; the error does not)."""
    first = first_line(message)
    return f"{kind}: {re.sub(r'[0-9]+', '#', first)[:300]}"


class RepeatCounter:
    """Worker errors across the attempts of a worker group, by rank, step and signature: the one that comes
    back `limit` times (0: never) is called repeated. Each rank ends an attempt with one error at most, so
    a count is a count of attempts."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: dict[tuple[int, int | None, str], int] = {}

    def failed(self, rank: int, step: int | None, kind: str, message: str) -> str | None:
        """The message that ends the run if this error (its type's name and message) has now come back `limit`
        times, else None."""
        key = (rank, step, signature(kind, message))
        self.seen[key] = count = self.seen.get(key, 0) + 1
        if not self.limit or count < self.limit:
            return None
        where = f"after step {step}" if step is not None else "while starting"
        first = first_line(message)[:500]
        return redact(f"rank {rank} failed {where} in {count} attempts of the worker group with the same error, "
                      f"{kind}: {first}; a restart would meet it again, so the run ends here "
                      f"(failure.same_failure_limit: {self.limit})")


class FailurePolicy(DefaultFailurePolicy):
    """Ray Train's own policy (failure.max_failures, max_preemptions), except that a deterministic error is
    never retried. Each decision is said in a line of shardrun's (Ray Train's own log of it stays off the
    console): what ended the group, what it counts against, and whether it restarts."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if deterministic_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        decision = super().make_decision(training_failed_error)
        fs.log(decision_line(training_failed_error, decision))
        return decision


def decision_line(error: TrainingFailedError, decision: FailureDecision) -> str:
    """`the worker group ended: a preemption (failure.max_preemptions); Ray Train restarts it`."""
    if _is_preemption(error):
        source = "a preemption (counted against failure.max_preemptions)"
    elif isinstance(error, ControllerError):
        source = "a controller error (Ray Train's own)"
    else:
        source = "a worker failure (counted against failure.max_failures)"
    what = "Ray Train restarts it" if decision == FailureDecision.RETRY else "no restarts are left: the run ends"
    return f"the worker group ended: {source}; {what}"


def _is_preemption(error: TrainingFailedError) -> bool:
    try:
        from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

        return _is_preemption_failure(error)
    except (ImportError, AttributeError):  # an internal of Ray Train's: without it, no preemption is named
        return False


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
