"""The log window: what the steps since the last log step add up to in the progress record."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class LogWindow:
    """Loss (kept on the device: no sync per step), data wait and time since the last record; record()
    turns them into loss, throughput and MFU and starts the next window."""

    def __init__(self, *, device: str, tokens_per_step: int, global_batch: int, world_size: int,
                 flops_per_token: float, peak_flops: float | None, clock: Callable[[], float] = time.perf_counter):
        self.tokens_per_step, self.global_batch, self.world_size = tokens_per_step, global_batch, world_size
        self.flops_per_token, self.peak_flops, self.clock = flops_per_token, peak_flops, clock
        self._loss = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self._loss.zero_()
        self.steps = 0
        self.finite = 0
        """Steps whose update was applied: their loss counts."""
        self.wait = 0.0
        self.start = self.clock()

    def add(self, loss: torch.Tensor | None, wait: float) -> None:
        """One step: its mean loss (None when its update was skipped) and its seconds waiting for data."""
        self.steps += 1
        self.wait += wait
        if loss is not None:
            self._loss += loss
            self.finite += 1

    def exclude(self, seconds: float) -> None:
        """Time that is not training (a checkpoint save) leaves the window's throughput."""
        self.start += seconds

    def mean_loss(self) -> torch.Tensor:
        """This rank's mean loss over the window's applied steps; NaN when there were none."""
        if not self.finite:
            return torch.full((), float("nan"), device=self._loss.device)
        return self._loss / self.finite

    def record(self, state: dict, *, loss: float, lr: float, grad_norm: float | None) -> dict:
        """The progress record: the train state, the window's loss (all ranks), lr, rates, grad norm and MFU;
        the next window starts."""
        elapsed = self.clock() - self.start
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        mfu = None
        if self.peak_flops and tokens_per_s:
            mfu = tokens_per_s / self.world_size * self.flops_per_token / self.peak_flops
        record = {**state, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                  "samples_per_s": self.steps * self.global_batch / elapsed,
                  "step_time": elapsed / max(1, self.steps), "data_wait_fraction": self.wait / elapsed,
                  "grad_norm": grad_norm, "mfu": mfu}
        self._reset()
        return record
