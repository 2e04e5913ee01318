"""The validation loop (the spec's `eval` section): the model's loss on held-out data, between training steps.

The held-out set is the first `eval.max_batches x micro_batch_size` rows of `eval.paths` in file order, cut into
micro-batches; batch b is rank b mod world's (`assigned`), so that the set, and each batch, is the same for
every world size. Every rank runs the same number of forwards (ZeRO-3 gathers parameters in each one, with every
rank): a rank without a batch of its own in a round repeats its last one, weighted zero. Each batch's summed loss
and its token count (rows, for a table) are gathered and added up in batch order, in float64, so the mean is
the same number for 1 or 8 ranks.

It leaves training as it was: the training stream is not touched (the held-out rows come through a reader of
their own, decoded once and kept), the model goes back to train mode, and torch's random states are restored.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from shardrun.config import JobSpec
from shardrun.datasets.index import DataIndex
from shardrun.datasets.index import build as build_index
from shardrun.datasets.reader import IGNORE_INDEX, RowGroupReader, decode_rows
from shardrun.trainer import engine as engines
from shardrun.trainer import models


def assigned(batches: int, world: int, rank: int) -> list[int | None]:
    """The batches rank evaluates, round by round: b = round x world + rank; None where it has none in a
    round (it repeats a batch, weighted zero). Every rank gets the same number of rounds."""
    rounds = math.ceil(batches / world)
    return [b if (b := r * world + rank) < batches else None for r in range(rounds)]


def is_due(spec: JobSpec, step: int, *, last: bool) -> bool:
    """Whether to evaluate after step: every eval.every_steps, and after the last step with eval.at_end."""
    e = spec.eval
    if e is None:
        return False
    return bool((e.every_steps and step % e.every_steps == 0) or (last and e.at_end))


def total(parts: list[list[tuple[int, float, int]]]) -> tuple[float, int]:
    """Every rank's (batch, loss sum, count) added up in batch order: the mean loss and the count."""
    rows = sorted(p for rank in parts for p in rank)
    loss = math.fsum(s for _, s, _ in rows)
    count = sum(n for _, _, n in rows)
    return (loss / count if count else float("nan")), count


class Evaluator:
    def __init__(self, spec: JobSpec, topology, *, vocab_size: int | None = None):
        self.spec, self.topology = spec, topology
        self.data = spec.eval_data()
        self.index: DataIndex = build_index(self.data)
        self.micro = spec.deepspeed.micro_batch_size
        self.rows = min(self.index.rows, spec.eval.max_batches * self.micro)
        self.batches = math.ceil(self.rows / self.micro)
        self.mine = assigned(self.batches, topology.world_size, topology.rank)
        self.float_dtype = engines.module_dtype(spec.deepspeed.precision)
        self._reader = RowGroupReader(self.data, self.index, vocab_size)
        self._held: dict[int, dict[str, torch.Tensor]] | None = None

    def _load(self) -> dict[int, dict[str, torch.Tensor]]:
        """This rank's batches, decoded once: the first self.rows rows in file order, cut into micro-batches."""
        need = {b for b in self.mine if b is not None} or {0}  # none of its own: batch 0, to repeat
        held, row = {}, 0
        for g in range(self.index.num_row_groups):
            if row >= self.rows:
                break
            n = int(self.index.rg_rows[g])
            first, last = row // self.micro, (min(row + n, self.rows) - 1) // self.micro
            if need & set(range(first, last + 1)):
                decoded = self._reader.read(g)
                for b in range(first, last + 1):
                    if b in need:
                        lo, hi = max(b * self.micro, row), min((b + 1) * self.micro, self.rows, row + n)
                        part = _rows(decoded, lo - row, hi - row)
                        held[b] = part if b not in held else _concat(held[b], part)
            row += n
        return {b: self._batch(v) for b, v in held.items()}

    def _batch(self, part) -> dict[str, torch.Tensor]:
        device = self.topology.device
        if isinstance(part, np.ndarray):  # token rows: (n, seq_len + 1), PAD where a row is short
            batch = decode_rows(torch.from_numpy(part.astype(np.int64)), positions=self._reader.positions)
            return {k: v.to(device) for k, v in batch.items()}
        label = self.data.label
        cols = {("label" if k == label else k): torch.from_numpy(np.array(v)).to(device)  # a writable copy
                for k, v in part.items()}
        return engines.as_module_dtype(cols, self.float_dtype)

    @torch.no_grad()
    def evaluate(self, engine, collectives) -> dict:
        """The held-out loss now, the same on every rank: {eval_loss, eval_tokens (a table: eval_rows),
        eval_seconds}."""
        start = time.perf_counter()
        if self._held is None:
            self._held = self._load()
        module = engine.module
        training = module.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        module.eval()
        positions = models.takes_positions(module)
        mine: list[tuple[int, float, int]] = []
        try:
            last = None
            for b in self.mine:
                batch = self._held[b] if b is not None else last or self._held.get(self._first())
                if batch is None:
                    break  # no rows at all: nothing any rank can run
                if "inputs" in batch:
                    extra = {"position_ids": batch["position_ids"]} if positions and "position_ids" in batch else {}
                    loss = engine(batch["inputs"], batch["targets"], **extra)
                else:
                    loss = engine(**batch)
                if b is not None:
                    count = int((batch["targets"] != IGNORE_INDEX).sum()) if "targets" in batch else \
                        int(next(iter(batch.values())).shape[0])  # a table: its rows
                    mine.append((b, float(loss.double()) * count, count))
                    last = batch
        finally:
            module.train(training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        loss, count = total(collectives.gather(mine))
        unit = "eval_tokens" if self.data.format == "tokens" else "eval_rows"
        return {"eval_loss": loss, unit: count, "eval_seconds": round(time.perf_counter() - start, 3)}

    def _first(self) -> int | None:
        """The batch a rank repeats when it has none of its own (more ranks than batches): batch 0."""
        return next(iter(self._held), None)


def _rows(decoded, lo: int, hi: int):
    if isinstance(decoded, np.ndarray):
        return decoded[lo:hi]
    return {k: v[lo:hi] for k, v in decoded.items()}


def _concat(a, b):
    if isinstance(a, np.ndarray):
        return np.concatenate([a, b])
    return {k: np.concatenate([a[k], b[k]]) for k in a}


class _Chosen:
    """A checkpoint store that holds one checkpoint: restore() loads it (and converts it for this world size)."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str]:
        yield self.path


def evaluate_checkpoint(spec: JobSpec, path: str, topology) -> dict:
    """`shardrun eval`: the held-out loss of the checkpoint at path (a local folder), on this process's ranks
    (one, or torchrun's), with the run's model and the spec's eval section: {step, eval_loss, eval_tokens or
    eval_rows, eval_seconds}."""
    from shardrun.trainer.collectives import Collectives
    from shardrun.trainer.control import FLAGS
    from shardrun.trainer.restore import restore

    engines.init_distributed(topology)
    collectives = Collectives(topology, FLAGS)
    restored = restore(spec, _Chosen(path), topology)
    evaluator = Evaluator(spec, topology, vocab_size=models.vocab_size(spec.model, restored.engine.module))
    return {"step": restored.state.step, **evaluator.evaluate(restored.engine, collectives)}
