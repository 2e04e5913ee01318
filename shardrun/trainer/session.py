"""The worker loop's windows on whatever launched it, one per concern: where checkpoints come from and go, who
hears how the run goes, and (under a launcher that places workers) what happens to the machines.

Ray's implementations live in shardrun.cluster.worker; a lone process or torchrun uses shardrun.driver.local's,
which places nothing and so has no Placement.
"""

from __future__ import annotations

from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Protocol


class CheckpointStore(Protocol):
    def latest_checkpoint(self) -> ContextManager[str | None]:
        """A local directory holding the latest committed checkpoint, or None."""

    def checkpoint_dir(self, step: int, metrics: dict) -> ContextManager[str]:
        """A directory to write step's checkpoint into; it is committed when the block ends (every rank)."""


class RunReporter(Protocol):
    """Rank 0's reports (failed: any rank's); stop_requested is asked from a background thread."""

    def started(self, info: dict) -> None:
        """The worker group started at info['step']."""

    def progress(self, record: dict) -> None:
        """One step record (step, loss, lr, samples, tokens, tokens_per_s, step_time)."""

    def note(self, line: str) -> None:
        """A line for the run's log that is no step record."""

    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (SIGTERM, ray job stop)."""

    def stopped(self) -> None:
        """The group checkpointed and stopped on request before max_steps."""

    def finished(self) -> None:
        """Training reached max_steps."""

    def failed(self, rank: int, step: int | None, error: BaseException) -> str | None:
        """Any rank, as it ends with `error` after `step` (None: while starting): why the run must end here
        instead of restarting (the same error at the same step in too many attempts), or None."""


class Placement(Protocol):
    def leaving(self, reason: str) -> tuple[str | None, str]:
        """A rank whose machine is about to be taken away: keep new work off it. Returns the id of the node
        that the launcher drains (None when it drains none) and what was done, for the log."""

    def wait_gone(self, nodes: list[str], timeout: float) -> bool:
        """Wait until the launcher sees every one of `nodes` gone (at most timeout seconds); True if so."""

    def drain_notice(self) -> str | None:
        """Every step, on every rank, cheap: what the launcher knows of a node of this group being drained
        (and so about to go) by someone else, or None."""


@dataclass(frozen=True)
class Session:
    store: CheckpointStore
    reporter: RunReporter
    placement: Placement | None = None
    """None: the launcher places nothing (a lone process, torchrun): a preempted VM's rank only stops."""
