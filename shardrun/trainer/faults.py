"""Fault injection, for the tests of recovery (and for trying it on a real cluster): one object the loop is
given, a no-op unless it was made from a fault description.

A fault is "<point>:step=<n>:rank=<r>": rank r meets the fault at <point> at step n (`step=a-b`: every step
from a to b; no step or rank: every one). With a marker file a fault fires once: the file records that it
did, so the restarted worker group runs through. Points:
- `checkpoint-save`: the rank dies by SIGKILL after writing its DeepSpeed files (the rest of the
  checkpoint is not written);
- `nonfinite-loss`: the rank's loss of that step is NaN (failure.nonfinite_loss decides what follows);
- `stall`: the rank stops itself (SIGSTOP) after the step, like a hung peer: alive, silent;
- `crash`: the rank raises a RuntimeError after the step, as a bug in a model would;
- `kill`: the rank dies by SIGKILL after the step, as a worker the kernel's OOM killer or a lost VM takes.
A step delay makes every step that much longer, so that a test can act mid-run.

Launchers read them from the environment once, at the worker's entry (FaultInjector.from_env):
SHARDRUN_FAULT, SHARDRUN_FAULT_MARKER and SHARDRUN_STEP_DELAY (seconds).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

POINTS = ("checkpoint-save", "nonfinite-loss", "stall", "crash", "kill")


@dataclass(frozen=True)
class FaultInjector:
    fault: str = ""
    """"<point>:step=<n>:rank=<r>", or "" for none."""
    marker: str = ""
    """A file that makes the fault fire once ("" : every time it matches)."""
    step_delay: float = 0.0
    """Seconds added to every step."""

    @classmethod
    def from_env(cls) -> FaultInjector:
        return cls(os.environ.get("SHARDRUN_FAULT", ""), os.environ.get("SHARDRUN_FAULT_MARKER", ""),
                   float(os.environ.get("SHARDRUN_STEP_DELAY", 0) or 0))

    def active(self, point: str, *, step: int, rank: int) -> bool:
        """Whether the fault is <point> on this rank at this step (and its marker allows it)."""
        if not self.fault:
            return False
        name, *fields = self.fault.split(":")
        where = dict(field.split("=", 1) for field in fields)
        first, _, last = where.get("step", str(step)).partition("-")
        if name != point or not int(first) <= step <= int(last or first) or int(where.get("rank", rank)) != rank:
            return False
        if self.marker:
            if os.path.exists(self.marker):
                return False
            with open(self.marker, "w") as f:
                f.write(f"{point} step {step} rank {rank}\n")
        return True

    def after_engine_save(self, *, step: int, rank: int) -> None:
        """`checkpoint-save`: die by SIGKILL with DeepSpeed's files written and the rest not."""
        if self.active("checkpoint-save", step=step, rank=rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, loss: torch.Tensor, *, step: int, rank: int) -> torch.Tensor:
        """`nonfinite-loss`: this micro-batch's loss made NaN."""
        if self.fault.startswith("nonfinite-loss") and self.active("nonfinite-loss", step=step, rank=rank):
            return loss * float("nan")
        return loss

    def delay(self) -> None:
        """The step delay, inside the step (its time counts as the step's)."""
        if self.step_delay:
            time.sleep(self.step_delay)

    def after_step(self, *, step: int, rank: int) -> None:
        """`stall`: stop this process (SIGSTOP), alive and silent; `crash`: raise an error; `kill`: die (SIGKILL)."""
        if self.fault.startswith("stall") and self.active("stall", step=step, rank=rank):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.fault.startswith("kill") and self.active("kill", step=step, rank=rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault.startswith("crash") and self.active("crash", step=step, rank=rank):
            raise RuntimeError(f"injected crash (SHARDRUN_FAULT) after step {step} on rank {rank}")
