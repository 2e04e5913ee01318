"""Arrow/Parquet data for the workers: `open(spec, topology, position)` gives a rank its stream."""

from __future__ import annotations

from shardrun.config import DataSpec
from shardrun.datasets.index import DataIndex
from shardrun.datasets.index import build as build_index
from shardrun.datasets.stream import Stream


def open(spec: DataSpec, topology, position: dict | None, *, micro_batch_size: int,  # noqa: A001
         grad_accum_steps: int, index: DataIndex | dict | None = None) -> Stream:
    """This rank's stream of micro-batches, continuing from `position` (None: the start).

    `index` is the run's data index (built once by the driver); without it this rank reads the
    file footers itself.
    """
    if index is None:
        index = build_index(spec)
    elif isinstance(index, dict):
        index = DataIndex.from_dict(index)
    return Stream(spec, index, rank=topology.rank, world_size=topology.world_size,
                  micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                  position=position, device=topology.device)


__all__ = ["open", "build_index", "DataIndex", "Stream"]
