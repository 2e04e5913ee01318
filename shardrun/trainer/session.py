"""The worker loop's one window on its launcher: where checkpoints come from and go, who hears progress.

Ray's implementation lives in shardrun.cluster; LocalSession serves a lone process or torchrun.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

import torch.distributed as dist

from shardrun import storage
from shardrun.trainer.progress import Progress
from shardrun.trainer.topology import Topology


class Session(Protocol):
    def latest_checkpoint(self) -> ContextManager[str | None]:
        """A local directory holding the latest complete checkpoint, or None."""

    def checkpoint_dir(self, step: int, metrics: dict) -> ContextManager[str]:
        """A directory to write step's checkpoint into; it is committed when the block ends."""

    def started(self, info: dict) -> None:
        """Rank 0: the worker group started at info['step']."""

    def progress(self, record: dict) -> None:
        """Rank 0: one step record (step, loss, lr, samples, tokens, tokens_per_s, step_time)."""

    def note(self, line: str) -> None:
        """Rank 0: a line for the run's log that is no step record."""

    def stop_requested(self) -> bool:
        """Rank 0, from a background thread: whether the run was asked to stop (SIGTERM, ray job stop)."""

    def stopped(self) -> None:
        """Rank 0: the group checkpointed and stopped on request before max_steps."""

    def leaving(self, reason: str) -> tuple[str | None, str]:
        """A rank whose machine is about to be taken away: keep new work off it. Returns the id of the node
        that the launcher drains (None when it drains none) and what was done, for the log."""

    def wait_gone(self, nodes: list[str], timeout: float) -> bool:
        """Wait until the launcher sees every one of `nodes` gone (at most timeout seconds); True if so."""

    def drain_notice(self) -> str | None:
        """Every step, on every rank, cheap: what the launcher knows of a node of this group being drained
        (and so about to go) by someone else, or None."""

    def finished(self) -> None:
        """Rank 0: training reached max_steps."""


TERMINATED = threading.Event()
"""Set by run_local's SIGTERM handler (torchrun passes SIGTERM on to every rank)."""


class LocalSession:
    """Checkpoints under <run dir>/checkpoints on a local (or shared) disk; progress on stdout."""

    def __init__(self, run_dir: str, topology: Topology, *, keep: int, max_steps: int,
                 byte_level: bool, observer=None):
        self.root = os.path.join(run_dir, "checkpoints")
        self.run_dir = run_dir
        self.topology = topology
        self.keep = keep
        self.progress_log = Progress(max_steps=max_steps, byte_level=byte_level)
        self.observer = observer
        """Rank 0's RunObserver (metrics.jsonl, job metrics, Prometheus targets), if any."""

    def _latest_path(self) -> str | None:
        name = storage.read_text(os.path.join(self.root, "latest"))
        return os.path.join(self.root, name.strip()) if name else None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        yield self._latest_path()

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int, metrics: dict) -> Iterator[str]:
        name = f"step_{step:08d}"
        staging = os.path.join(self.root, f".staging-{name}")
        if self.topology.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        _barrier()
        yield staging
        _barrier()  # every rank has written its part
        if self.topology.is_main:
            final = os.path.join(self.root, name)
            shutil.rmtree(final, ignore_errors=True)
            # on the disk before it is renamed into place: after a host crash `latest` never names a folder
            # whose pages were lost (on a shared disk the writers' close already sent them to the server)
            storage.sync_tree(staging)
            os.rename(staging, final)
            storage.sync_dir(self.root)
            storage.write_text(os.path.join(self.root, "latest"), name)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_"))
        for old in done[: -self.keep]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def started(self, info: dict) -> None:
        line = self.progress_log.on_start(info)
        if self.observer is not None:
            self.observer.started(info, line)
        else:
            self._print(line)

    def progress(self, record: dict) -> None:
        line = self.progress_log.on_record(record)
        if self.observer is not None:
            self.observer.record(record, line)
        else:
            self._print(line)

    def note(self, line: str) -> None:
        if self.observer is not None:
            self.observer.note({}, line)
        else:
            self._print(line)

    def stop_requested(self) -> bool:
        return TERMINATED.is_set()

    def leaving(self, reason: str) -> tuple[str | None, str]:
        return None, "torchrun places nothing: start the run again on other machines"

    def wait_gone(self, nodes: list[str], timeout: float) -> bool:
        return not nodes

    def drain_notice(self) -> str | None:
        return None

    def finished(self) -> None:
        self._write_summary(finished=True)

    def stopped(self) -> None:
        self._write_summary(finished=False)

    def _write_summary(self, *, finished: bool) -> None:
        summary = self.progress_log.summary(checkpoint=self._latest_path(), finished=finished)
        storage.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        if self.observer is not None:
            self.observer.console.close()  # the progress bar ends above the summary
        self._print(f"{'done' if finished else 'stopped'}: {summary}")

    @staticmethod
    def _print(line: str) -> None:
        print(f"[shardrun] {line}", file=sys.stdout, flush=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
