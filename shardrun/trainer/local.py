"""Run the worker loop without Ray: one process, or one rank of a torchrun job."""

from __future__ import annotations

import signal

from shardrun.config import JobSpec
from shardrun.errors import UserError, redact
from shardrun.metrics.observer import RunObserver
from shardrun.trainer.loop import worker_main
from shardrun.trainer.session import TERMINATED, LocalSession
from shardrun.trainer.topology import Topology


def run_local(spec: JobSpec, data_index: dict | None = None) -> None:
    """Train this rank with checkpoints under <run dir>/checkpoints (a disk every rank sees)."""
    if "://" in spec.checkpoint.storage:
        raise UserError(f"checkpoint.storage is {redact(spec.checkpoint.storage)}: `shardrun train` (one process or "
                        "torchrun) keeps checkpoints on a disk every rank sees; use `shardrun run` (Ray uploads "
                        "them to object storage) or a mounted path")
    topology = Topology.from_env(spec.scaling.use_gpu)
    observer = RunObserver(spec, LocalSession._print) if topology.is_main else None
    session = LocalSession(
        spec.run_dir, topology, keep=spec.checkpoint.keep, max_steps=spec.run.max_steps,
        byte_level=spec.model.byte_level, observer=observer,
    )
    ok = False
    previous = signal.signal(signal.SIGTERM, lambda *_: TERMINATED.set())  # stop at the next step, saved
    try:
        worker_main(spec, session, topology, data_index=data_index)
        ok = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if observer is not None:
            observer.close("succeeded" if ok else "failed")
