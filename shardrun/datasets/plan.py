"""The global sample order: a pure function of (row group sizes, partitions, seed, window, epoch).

Per epoch, a seeded permutation of the row groups is dealt to P logical partitions, each row group
to the partition with the fewest rows so far (so partitions differ by less than one row group).
Inside a partition, rows follow their row groups in dealt order and are shuffled within windows of
`window` samples. A global step takes the next k = global_batch / P samples of every partition;
rank r of a world of W owns the partitions p with p mod W == r, so every row group is decoded by
one rank, and the samples of a step are the same set for any W that divides P.

An epoch lasts as many steps as its shortest partition allows; the rows left over in longer
partitions (less than one row group plus one step's share per partition) are not used in that
epoch. The next epoch deals the row groups anew, so a different remainder is left out.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

_SEED_MOD = 2**63


class Plan:
    def __init__(self, rg_rows: np.ndarray, *, partitions: int, seed: int, window: int):
        self.rg_rows = np.asarray(rg_rows, dtype=np.int64)
        self.partitions = partitions
        self.seed = seed % _SEED_MOD
        self.window = window
        self._epoch = lru_cache(maxsize=2)(self._deal)
        self._perm = lru_cache(maxsize=64)(self._window_perm)

    def _deal(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per partition: its row groups in order, and their cumulative row offsets (len + 1)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rg_rows))
        heap = [(0, p) for p in range(self.partitions)]
        dealt: list[list[int]] = [[] for _ in range(self.partitions)]
        for g in order.tolist():
            load, p = heapq.heappop(heap)
            dealt[p].append(g)
            heapq.heappush(heap, (load + int(self.rg_rows[g]), p))
        groups = [np.array(d, dtype=np.int64) for d in dealt]
        cums = [np.concatenate([[0], np.cumsum(self.rg_rows[g])]) for g in groups]
        return groups, cums

    def partition_rows(self, epoch: int) -> list[int]:
        return [int(c[-1]) for c in self._epoch(epoch)[1]]

    def steps_in_epoch(self, epoch: int, per_partition: int, offset: int = 0) -> int:
        """Steps that take per_partition samples from every partition, starting at offset."""
        return max(0, (min(self.partition_rows(epoch)) - offset) // per_partition)

    def _window_perm(self, epoch: int, p: int, w: int, length: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, p, w, 1]).permutation(length)

    def samples(self, epoch: int, p: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples [start, start + count) of partition p: (row group ids, row within each)."""
        groups, cums = self._epoch(epoch)
        cum, size = cums[p], int(cums[p][-1])
        if start + count > size:
            raise IndexError(f"partition {p} of epoch {epoch} has {size} samples, asked up to {start + count}")
        o = np.arange(start, start + count, dtype=np.int64)
        w, j = np.divmod(o, self.window)
        pos = np.empty_like(o)
        for wi in np.unique(w).tolist():
            base = wi * self.window
            perm = self._perm(epoch, p, wi, min(self.window, size - base))
            sel = w == wi
            pos[sel] = base + perm[j[sel]]
        at = np.searchsorted(cum, pos, side="right") - 1
        return groups[p][at], pos - cum[at]

    def window_groups(self, epoch: int, p: int, w: int) -> np.ndarray:
        """Row groups that hold the rows of window w of partition p (empty past its end)."""
        groups, cums = self._epoch(epoch)
        cum = cums[p]
        lo, hi = w * self.window, min((w + 1) * self.window, int(cum[-1]))
        if lo >= hi:
            return groups[p][:0]
        first = np.searchsorted(cum, lo, side="right") - 1
        last = np.searchsorted(cum, hi - 1, side="right") - 1
        return groups[p][first : last + 1]
