"""Parquet layouts for data tests: row i holds [i, i+1, ...], so a batch's first column names its rows."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_LEN = 5


def write_layout(root: Path, layout: list[list[int]], fixed: bool = True) -> int:
    """Files of row groups of the given sizes; row i holds [i, i+1, ..]: the first token is its id."""
    root.mkdir(parents=True, exist_ok=True)
    next_id = 0
    for f, groups in enumerate(layout):
        with pq.ParquetWriter(root / f"part-{f:03d}.parquet", _schema(fixed)) as w:
            for n in groups:
                ids = np.arange(next_id, next_id + n, dtype=np.int32)
                w.write_table(_table(ids, fixed))
                next_id += n
    return next_id


def _schema(fixed):
    t = pa.list_(pa.int32(), ROW_LEN) if fixed else pa.list_(pa.int32())
    return pa.schema([("tokens", t)])


def _table(ids, fixed):
    values = (ids[:, None] + np.arange(ROW_LEN, dtype=np.int32)).reshape(-1)
    if fixed:
        col = pa.FixedSizeListArray.from_arrays(pa.array(values), ROW_LEN)
    else:
        col = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, ROW_LEN, dtype=np.int32)),
                                       pa.array(values))
    return pa.table({"tokens": col})


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the data pages of a row group, keeping the footer: the file opens and indexes, that group
    fails when it is read."""
    meta = pq.read_metadata(path)
    col = meta.row_group(group).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
