"""Run the worker loop without Ray: one process, or one rank of a torchrun job. Checkpoints go to
<run dir>/checkpoints on a disk every rank sees; rank 0 prints the run's lines and writes its files."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator

import torch.distributed as dist

from shardrun import checkpoint_format as layout
from shardrun import fs
from shardrun.config import JobSpec
from shardrun.driver.observer import RunObserver
from shardrun.driver.run_log import RunLog, carry_over, summary_line
from shardrun.driver.stop_signals import StopSignals
from shardrun.errors import UserError, redact
from shardrun.metrics import bind_host
from shardrun.trainer.entry import worker_main
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology


def run_local(spec: JobSpec, data_index: dict | None = None, *, faults: FaultInjector | None = None) -> str | None:
    """Train this rank with checkpoints under <run dir>/checkpoints; the signal that stopped it (after a
    checkpoint) before max_steps, or None."""
    if fs.is_uri(spec.checkpoint.storage):
        raise UserError(f"checkpoint.storage is {redact(spec.checkpoint.storage)}: `shardrun train` (one process or "
                        "torchrun) keeps checkpoints on a disk every rank sees; use `shardrun run` (Ray uploads "
                        "them to object storage) or a mounted path")
    topology = Topology.from_env(spec.scaling.use_gpu)
    across_nodes = int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", topology.world_size))
    spec.metrics.host = bind_host(spec.metrics.host, cluster=across_nodes)
    observer = RunObserver(spec, _print) if topology.is_main else None
    store = LocalCheckpointStore(spec.run_dir, topology, keep=spec.checkpoint.keep, keep_best=spec.checkpoint.keep_best)
    reporter = LocalReporter(store, spec, observer)
    ok = False
    try:
        with StopSignals(reporter.request_stop, _print if topology.is_main else lambda line: None):
            state = worker_main(spec, Session(store, reporter), topology, data_index=data_index, faults=faults)
        ok = True
    finally:
        if observer is not None:
            observer.close("succeeded" if ok else "failed")
    return reporter.stop_reason if state.step < spec.run.max_steps else None


class LocalCheckpointStore:
    """Checkpoints in <run dir>/checkpoints on a local or shared disk: written into a staging folder, renamed
    into place by rank 0 once every rank has written its part, then named in `latest`."""

    def __init__(self, run_dir: str, topology: Topology, *, keep: int, keep_best: bool = False):
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, layout.LOCAL_FOLDER)
        self.topology = topology
        self.keep, self.keep_best = keep, keep_best

    def latest_path(self) -> str | None:
        name = fs.read_text(os.path.join(self.root, layout.LATEST))
        return os.path.join(self.root, name.strip()) if name else None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        """The checkpoint `latest` names, or a newer complete one in the run dir: one that `shardrun run` wrote
        (a run dir is one run, whichever launcher continues it), or one `latest` missed."""
        recorded = self.latest_path()
        complete = {c["step"]: c for c in layout.list_checkpoints(self.run_dir) if c["complete"]} \
            if os.path.isdir(self.run_dir) else {}
        step = layout.resume_from(layout.step_of(recorded) if recorded else None, list(complete))
        if step is not None:
            if self.topology.is_main:
                _print(f"resuming from the newest complete checkpoint in the run dir, {complete[step]['path']}")
            recorded = complete[step]["path"]
        yield recorded

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int, metrics: dict) -> Iterator[str]:
        name = layout.local_dir_name(step)
        staging = os.path.join(self.root, layout.STAGING_PREFIX + name)
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
            fs.sync_tree(staging)
            os.rename(staging, final)
            fs.sync_dir(self.root)
            fs.write_text(os.path.join(self.root, layout.LATEST), name)
            self._prune(step)
        _barrier()

    def _prune(self, committed: int) -> None:
        """Keep the checkpoint just committed and the keep - 1 before it; remove staging folders left by a
        crash. Folders of later steps (left by an attempt that went further before it crashed) are not this
        run's history: they stay until the run reaches their step and replaces them."""
        names = os.listdir(self.root)
        older = sorted((int(m[1]), n) for n in names if (m := layout.STEP_DIR.match(n)) and int(m[1]) < committed)
        if self.keep_best:  # the keep of the lowest held-out loss, and the newest
            losses = {step: _eval_loss(os.path.join(self.root, n)) for step, n in older}
            kept = layout.kept_steps({**losses, committed: _eval_loss(os.path.join(self.root,
                                                                                   layout.local_dir_name(committed)))},
                                     committed, self.keep)
            doomed = [n for step, n in older if step not in kept]
        else:
            doomed = [n for _, n in older[: max(0, len(older) - (self.keep - 1))]]
        doomed += [n for n in names if n.startswith(layout.STAGING_PREFIX)]
        for old in doomed:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)


def _eval_loss(folder: str) -> float | None:
    """The held-out loss a checkpoint's manifest records, if any."""
    found = fs.read_json(os.path.join(folder, layout.MANIFEST))
    return found.get("eval_loss") if isinstance(found, dict) else None


class LocalReporter:
    """Rank 0's lines through the run's observer (console, metrics.jsonl, Prometheus targets); summary.json at
    the end. A stop signal (run_local's StopSignals) is the stop request."""

    def __init__(self, store: LocalCheckpointStore, spec: JobSpec, observer: RunObserver | None):
        self.store = store
        self.run_dir = spec.run_dir
        self.log = RunLog(max_steps=spec.run.max_steps, byte_level=spec.model.byte_level)
        self.observer = observer
        self.stop_reason: str | None = None
        """The signal that asked this rank to stop, if one did (set by a signal handler, read by the stop
        poller's thread: one assignment, nothing to lock)."""

    def started(self, info: dict) -> None:
        line = self.log.on_start(info)
        self._emit(lambda: self.observer.started(info, line), line)

    def progress(self, record: dict) -> None:
        line = self.log.on_record(record)
        self._emit(lambda: self.observer.record(record, line), line)

    def note(self, line: str) -> None:
        self._emit(lambda: self.observer.note({}, line), line)

    def failed(self, rank: int, step: int | None, error: BaseException) -> str | None:
        return None  # no restarts counted here: torchrun's (--max-restarts) are new processes

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def finished(self) -> None:
        self._write_summary(finished=True)

    def stopped(self) -> None:
        self._write_summary(finished=False)

    def _emit(self, observed, line: str) -> None:
        if self.observer is not None:
            observed()
        else:
            _print(line)

    def _write_summary(self, *, finished: bool) -> None:
        summary = self.log.summary(checkpoint=self.store.latest_path(), finished=finished)
        if not finished and self.stop_reason:
            summary["stopped"] = self.stop_reason
        path = os.path.join(self.run_dir, "summary.json")
        summary = carry_over(summary, fs.read_json(path))
        fs.write_json(path, summary)
        if self.observer is not None:
            self.observer.console.close()  # the progress bar ends above the summary
        _print(summary_line(summary, self.run_dir))


def _print(line: str) -> None:
    fs.log(line, file=sys.stdout)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
