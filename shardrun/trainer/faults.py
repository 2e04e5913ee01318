"""Fault injection, for the tests of recovery (and for trying it on a real cluster).

SHARDRUN_FAULT="<point>:step=<n>:rank=<r>" makes rank r meet the fault at <point> at step n
(`step=a-b`: every step from a to b). With SHARDRUN_FAULT_MARKER=<file> a fault fires once: the
file records that it did, so the restarted worker group runs through. Points:
- `checkpoint-save`: the rank dies by SIGKILL after writing its DeepSpeed files (the rest of the
  checkpoint is not written);
- `nonfinite-loss`: the rank's loss of that step is NaN (failure.nonfinite_loss decides what follows);
- `stall`: the rank stops itself (SIGSTOP) after the step, like a hung peer: alive, silent.

SHARDRUN_STEP_DELAY=<seconds> makes every step that much longer, so that a test can act mid-run.
"""

from __future__ import annotations

import os
import signal


def active(point: str, *, step: int, rank: int) -> bool:
    """Whether SHARDRUN_FAULT asks for <point> on this rank at this step (and its marker allows it)."""
    wanted = os.environ.get("SHARDRUN_FAULT")
    if not wanted:
        return False
    name, *fields = wanted.split(":")
    where = dict(field.split("=", 1) for field in fields)
    first, _, last = where.get("step", str(step)).partition("-")
    if name != point or not int(first) <= step <= int(last or first) or int(where.get("rank", rank)) != rank:
        return False
    marker = os.environ.get("SHARDRUN_FAULT_MARKER")
    if marker:
        if os.path.exists(marker):
            return False
        with open(marker, "w") as f:
            f.write(f"{point} step {step} rank {rank}\n")
    return True


def maybe_fail(point: str, *, step: int, rank: int) -> None:
    """Die by SIGKILL (or stop by SIGSTOP, at `stall`) if SHARDRUN_FAULT asks for it here."""
    if active(point, step=step, rank=rank):
        os.kill(os.getpid(), signal.SIGSTOP if point == "stall" else signal.SIGKILL)


def step_delay() -> float:
    return float(os.environ.get("SHARDRUN_STEP_DELAY", 0))
