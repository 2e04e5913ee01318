"""What a step whose loss or gradients are not finite leads to (failure.nonfinite_loss)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardrun.config import DeepSpeedSpec, FailureSpec

ADVICE = ("lower deepspeed.optimizer.lr, lengthen deepspeed.schedule.warmup_steps, keep deepspeed.grad_clip on, or "
          "look for bad values in the data; started again, the run resumes from its latest checkpoint")


@dataclass(frozen=True)
class NonFiniteAction:
    """What the loop does after a step: go on (note: a line for the run's log, if any) or stop (diverged)."""

    note: str | None = None
    diverged: str | None = None
    """The TrainingDiverged message: stop the run."""


GO_ON = NonFiniteAction()


class NonFinitePolicy:
    """DeepSpeed's ZeRO and bf16 optimizers discard an update whose gradient norm is not finite (and count it
    in engine.skipped_steps, the same on every rank); without either (ZeRO stage 0 in fp32) the update is
    applied, and only the log step's loss tells. fp16's loss scaler skips steps as it backs off: those are
    DeepSpeed's own business, not counted here."""

    def __init__(self, failure: FailureSpec, deepspeed: DeepSpeedSpec, skipped_before: int = 0):
        self.failure = failure
        self.can_skip = not (deepspeed.zero_stage == 0 and deepspeed.precision == "fp32")
        self.counts_skips = self.can_skip and deepspeed.precision != "fp16"
        self._skipped = skipped_before
        self.in_a_row = 0
        """Consecutive steps whose update was skipped."""
        self.total = 0

    def was_skipped(self, engine_skipped: int) -> bool:
        """Whether DeepSpeed left this step's update out, from its counter of skipped steps (a host number)."""
        if not self.counts_skips:
            return False
        before, self._skipped = self._skipped, engine_skipped
        return engine_skipped > before

    def on_step(self, step: int, skipped: bool) -> NonFiniteAction:
        """After each step: count a skipped update, and stop once failure.nonfinite_loss says so."""
        if not skipped:
            self.in_a_row = 0
            return GO_ON
        self.in_a_row += 1
        self.total += 1
        where = f"step {step}: the loss or the gradients are not finite"
        if self.failure.nonfinite_loss == "stop":
            return NonFiniteAction(diverged=f"{where} (failure.nonfinite_loss: stop): {ADVICE}")
        if self.in_a_row >= self.failure.max_nonfinite_steps:
            return NonFiniteAction(diverged=f"{where}, {self.in_a_row} steps in a row (failure.max_nonfinite_steps: "
                                            f"{self.failure.max_nonfinite_steps}): {ADVICE}")
        return NonFiniteAction(note=f"{where}; DeepSpeed skipped the update ({self.in_a_row} in a row, "
                                    f"{self.total} in this run so far)")

    def on_log(self, step: int, loss: float) -> NonFiniteAction:
        """At a log step, with the window's loss over all ranks: where updates are never skipped, a loss that
        is not finite means the weights are no longer trustworthy."""
        if self.can_skip or math.isfinite(loss):
            return GO_ON
        return NonFiniteAction(diverged=f"step {step}: the loss is {loss}; with ZeRO stage 0 in fp32 DeepSpeed "
                                        "applies updates whatever their gradients, so the weights are no longer "
                                        f"trustworthy. Stopped: {ADVICE}")
