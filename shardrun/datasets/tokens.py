"""TokenStream: this rank's micro-batches of a deterministic global sample order, resumable by step.

Global sample k of the run is row perm(seed, epoch)[k mod N] with epoch = k div N, so epochs follow
one another with no remainder dropped. Step s takes samples [s*G, (s+1)*G) where G is the global
batch; inside a step, rank r takes micro-batch m's slice [m*W*B + r*B, m*W*B + (r+1)*B).
The position is therefore the first sample of the next step, and a world of another size that
keeps G sees the same samples in every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardrun.errors import UserError


@dataclass(frozen=True, kw_only=True)
class BatchShape:
    micro_batch_size: int
    """Sequences per rank per micro step."""
    grad_accum_steps: int
    """Micro steps per optimizer step."""
    world_size: int
    """Ranks taking part."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


class TokenStream:
    """Micro-batches {'inputs', 'targets'} (int64, B x seq_len) for one rank."""

    def __init__(self, rows: np.ndarray, *, rank: int, shape: BatchShape, seed: int,
                 position: dict | None, device: str = "cpu"):
        if len(rows) == 0:
            raise UserError("data.paths: the Parquet files hold no rows")
        self.rows = rows
        self.rank = rank
        self.shape = shape
        self.seed = seed
        self.device = device
        self._epoch_perm: tuple[int, np.ndarray] | None = None
        self._next_step_sample = 0
        self._micro = 0
        if position:
            self._restore(position)

    def _restore(self, position: dict) -> None:
        if position.get("seed") != self.seed:
            raise UserError(
                f"data.seed is {self.seed} but the checkpoint's stream used seed "
                f"{position.get('seed')}; keep the seed to resume, or start over with --fresh"
            )
        if position.get("rows") != len(self.rows):
            raise UserError(
                f"the data now holds {len(self.rows)} rows, the checkpoint's {position.get('rows')}; "
                "resume on the same data, or start over with --fresh"
            )
        self._next_step_sample = int(position["sample"])

    def position(self) -> dict:
        """Where the next step starts: a small dict for the checkpoint."""
        if self._micro:
            raise RuntimeError("the stream position is only defined between steps")
        return {"seed": self.seed, "rows": len(self.rows), "sample": self._next_step_sample}

    def _perm(self, epoch: int) -> np.ndarray:
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_perm = (epoch, rng.permutation(len(self.rows)))
        return self._epoch_perm[1]

    def _row_ids(self, first: int, count: int) -> np.ndarray:
        n = len(self.rows)
        ids = np.empty(count, dtype=np.int64)
        for i, k in enumerate(range(first, first + count)):
            ids[i] = self._perm(k // n)[k % n]
        return ids

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch."""
        b, w = self.shape.micro_batch_size, self.shape.world_size
        first = self._next_step_sample + self._micro * w * b + self.rank * b
        batch = torch.from_numpy(self.rows[self._row_ids(first, b)]).to(self.device, torch.long)
        self._micro += 1
        if self._micro == self.shape.grad_accum_steps:
            self._micro = 0
            self._next_step_sample += self.shape.global_batch
        return {"inputs": batch[:, :-1], "targets": batch[:, 1:]}
