"""Arrow/Parquet data for the workers: `open(spec, topology, position)` gives a rank its stream.

Submodules are imported on first use, so that `shardrun.datasets.prepare` (and its process-pool
workers) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardrun.config import DataSpec
    from shardrun.datasets.index import DataIndex
    from shardrun.datasets.stream import Stream

_LAZY = {"DataIndex": "shardrun.datasets.index", "build_index": "shardrun.datasets.index",
         "Stream": "shardrun.datasets.stream"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, "build" if name == "build_index" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open(spec: DataSpec, topology, position: dict | None, *, micro_batch_size: int,  # noqa: A001
         grad_accum_steps: int, index: DataIndex | dict | None = None,
         partitions: int | None = None, vocab_size: int | None = None, wait_timeout: float = 600.0) -> Stream:
    """This rank's stream of micro-batches, continuing from `position` (None: the start).

    `index` is the run's data index (built once by the driver); without it this rank reads the
    file footers itself. `partitions` is a new run's partition count when data.partitions is unset
    (JobSpec.partitions); a resumed run keeps the count in its position. `vocab_size`: token ids must be
    below it (a row group with others is a bad row group, failed or skipped under data.on_bad_file).
    """
    from shardrun.datasets.index import DataIndex, build
    from shardrun.datasets.stream import Stream

    if index is None:
        index = build(spec)
    elif isinstance(index, dict):
        index = DataIndex.from_dict(index)
    return Stream(spec, index, rank=topology.rank, world_size=topology.world_size,
                  micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                  position=position, device=topology.device, partitions=partitions, vocab_size=vocab_size,
                  wait_timeout=wait_timeout)


__all__ = ["open", "build_index", "DataIndex", "Stream"]
