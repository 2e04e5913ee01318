"""Fault injection, for the tests of recovery (and for trying it on a real cluster).

SHARDRUN_FAULT="<point>:step=<n>:rank=<r>" makes rank r die by SIGKILL when it reaches <point> at
step n. With SHARDRUN_FAULT_MARKER=<file> it fires once: the file records that it did, so the
restarted worker group runs through. Points: `checkpoint-save` (this rank's DeepSpeed files are
written, the rest of the checkpoint is not).
"""

from __future__ import annotations

import os
import signal


def maybe_fail(point: str, *, step: int, rank: int) -> None:
    wanted = os.environ.get("SHARDRUN_FAULT")
    if not wanted:
        return
    name, *fields = wanted.split(":")
    where = dict(field.split("=", 1) for field in fields)
    if name != point or int(where.get("step", step)) != step or int(where.get("rank", rank)) != rank:
        return
    marker = os.environ.get("SHARDRUN_FAULT_MARKER")
    if marker:
        if os.path.exists(marker):
            return
        with open(marker, "w") as f:
            f.write(f"{point} step {step} rank {rank}\n")
    os.kill(os.getpid(), signal.SIGKILL)
