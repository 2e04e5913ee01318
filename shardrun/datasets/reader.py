"""Decode one row group of the index into numpy arrays (zero-copy from Arrow where the layout allows)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrun.config import DataSpec
from shardrun.datasets.index import DataIndex, first_line
from shardrun.fs import filesystem

PAD = -1
"""Token id marking padding in decoded token rows (never a real id)."""


class BadRowGroup(Exception):
    """A row group that cannot be decoded; str() names the file and row group."""


class RowGroupReader:
    """Thread-safe: each call opens its own reader over the file (footer cached after the first)."""

    def __init__(self, spec: DataSpec, index: DataIndex, vocab_size: int | None = None):
        self.spec = spec
        self.index = index
        self.vocab_size = vocab_size
        """Token ids must be below it (the model's vocabulary), when known."""
        self._filesystems = [filesystem(p)[0] for p in index.paths]
        self._footers: dict[int, pq.FileMetaData] = {}
        self._lock = threading.Lock()
        self.columns = self._columns()

    def _columns(self) -> list[str]:
        if self.spec.format == "tokens":
            return [self.spec.column]
        features = self.spec.columns or [c for c in self.index.schema if c != self.spec.label]
        return list(features) + ([self.spec.label] if self.spec.label else [])

    def read(self, g: int) -> np.ndarray | dict[str, np.ndarray]:
        """Row group g: token rows (n, seq_len + 1) int32 padded with PAD, or {column: array}."""
        f = self.index.files[self.index.rg_file[g]]
        j = int(self.index.rg_index[g])
        try:
            fs = self._filesystems[f.source]
            with fs.open_input_file(f.path) as handle:
                with self._lock:
                    footer = self._footers.get(self.index.rg_file[g])
                pf = pq.ParquetFile(handle, metadata=footer)
                if footer is None:
                    with self._lock:
                        self._footers[self.index.rg_file[g]] = pf.metadata
                table = pf.read_row_group(j, columns=self.columns)
        except (pa.ArrowException, OSError) as e:
            raise BadRowGroup(f"{self.index.describe(g)}: cannot be read ({first_line(e)})") from None
        if table.num_rows != self.index.rg_rows[g]:
            raise BadRowGroup(f"{self.index.describe(g)}: holds {table.num_rows} rows, its footer said "
                              f"{self.index.rg_rows[g]} when the run started (the file changed)")
        try:
            if self.spec.format == "tokens":
                return token_rows(table.column(0), self.spec.seq_len + 1, self.vocab_size)
            return {c: column_array(c, table.column(c)) for c in self.columns}
        except ValueError as e:
            raise BadRowGroup(f"{self.index.describe(g)}: {e}") from None


def token_rows(col: pa.ChunkedArray | pa.Array, row_len: int, vocab_size: int | None = None) -> np.ndarray:
    """Token sequences as an (n, row_len) int32 array: longer rows cut, shorter ones padded with PAD; a
    ValueError for null rows or ids, and ids outside 0..vocab_size - 1."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.null_count:
        raise ValueError(f"{col.null_count} rows are null")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size < row_len:  # the index refuses such files: this one changed since it was built
            raise ValueError(f"rows hold {col.type.list_size} tokens, fewer than data.seq_len + 1 = {row_len}")
        values = _ints(col.flatten(), vocab_size)
        return values.reshape(n, col.type.list_size)[:, :row_len]  # a view: no copy for int32
    offsets = col.offsets.to_numpy()
    values = _ints(col.values, vocab_size)
    lengths = np.diff(offsets)
    if n and lengths.min() >= row_len:
        return values[offsets[:-1, None] + np.arange(row_len)]
    out = np.full((n, row_len), PAD, dtype=np.int32)
    mask = np.arange(row_len) < lengths[:, None]
    out[mask] = values[(offsets[:-1, None] + np.arange(row_len))[mask]]
    return out


def _ints(arr: pa.Array, vocab_size: int | None = None) -> np.ndarray:
    if arr.null_count:  # numpy would make them NaN, then -2147483648
        raise ValueError(f"{arr.null_count} token ids inside the rows are null")
    values = arr.to_numpy(zero_copy_only=False)
    if not len(values):
        return values.astype(np.int32, copy=False)
    low, high = values.min(), values.max()
    limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
    if low < 0 or high >= limit:
        within = f"the model's vocabulary (0..{vocab_size - 1}, model.vocab_size)" if vocab_size is not None \
            else "0..2^31-1"
        raise ValueError(f"token ids range {low}..{high}, outside {within}")
    return values.astype(np.int32, copy=False)


def column_array(name: str, col: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as numpy: scalars (n,), fixed-size lists (n, size); floats as float32."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        raise ValueError(f"column {name!r} has {arr.null_count} null values")
    if pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    else:
        values = arr.to_numpy(zero_copy_only=False)
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    return values
