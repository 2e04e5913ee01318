"""The run dir, `<checkpoint.storage>/<name>`, made ready before a run's workers start."""

from __future__ import annotations

from collections.abc import Callable

from shardrun import fs
from shardrun.config import JobSpec
from shardrun.errors import redact


def prepare_run_dir(spec: JobSpec, *, fresh: bool, emit: Callable[[str], None]) -> None:
    """--fresh moves an earlier run of this name aside; the resolved spec is saved in the run dir, its storage
    secrets masked (the run dir is shared more widely than the credentials are)."""
    if fresh and fs.exists(spec.run_dir):
        aside = fs.move_aside(spec.run_dir, advice="delete it, or give the run another name (--fresh)")
        emit(f"--fresh: moved the earlier run to {redact(aside)}")
    fs.write_text(fs.join(spec.run_dir, "job.yaml"), redact(spec.to_yaml()))
