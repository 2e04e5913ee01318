"""Arrow/Parquet data for the workers: `open(spec, topology, position)` gives a rank its stream."""

from __future__ import annotations

from shardrun.config import DataSpec
from shardrun.datasets.source import read_token_rows
from shardrun.datasets.tokens import BatchShape, TokenStream


def open(spec: DataSpec, topology, position: dict | None, *, micro_batch_size: int,
         grad_accum_steps: int) -> TokenStream:  # noqa: A001 - the package's one verb
    """This rank's stream of token micro-batches, continuing from `position` (None: the start)."""
    rows = read_token_rows(spec.paths, spec.column, spec.seq_len + 1)
    shape = BatchShape(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                       world_size=topology.world_size)
    return TokenStream(rows, rank=topology.rank, shape=shape, seed=spec.seed, position=position,
                       device=topology.device)


__all__ = ["open", "BatchShape", "TokenStream"]
