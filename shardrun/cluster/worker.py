"""What runs on each Ray Train worker: the worker loop, with Ray behind the Session interface."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator

import ray
import ray.train

from shardrun.trainer.loop import worker_main


class RaySession:
    """Checkpoints through ray.train.report (merged per rank into storage); progress to an actor."""

    def __init__(self, progress_actor):
        self.progress_actor = progress_actor

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int, metrics: dict) -> Iterator[str]:
        staging = tempfile.mkdtemp(prefix=f"shardrun-step{step}-")
        try:
            yield staging
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(staging),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )
            # Wait until the controller has committed it. Reports queue on the workers until the
            # controller polls them: a group that dies before then would restart from an older
            # checkpoint (or none), though this one is already in storage.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def started(self, info: dict) -> None:
        self.progress_actor.started.remote(info)

    def progress(self, record: dict) -> None:
        self.progress_actor.record.remote(record)

    def note(self, line: str) -> None:
        self.progress_actor.note.remote(line)

    def stop_requested(self) -> bool:
        return ray.get(self.progress_actor.stop_requested.remote(), timeout=30)

    def stopped(self) -> None:
        ray.get(self.progress_actor.stopped.remote())

    def finished(self) -> None:
        ray.get(self.progress_actor.finished.remote())


def train_fn(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    worker_main(config["spec"], RaySession(config["progress"]), data_index=config.get("data_index"))
