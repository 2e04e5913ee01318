"""Decode one row group of the index into numpy arrays (zero-copy from Arrow where the layout allows)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shardrun.config import DataSpec
from shardrun.datasets.index import TOKEN_EXTRAS, DataIndex, first_line
from shardrun.fs import filesystem

PAD = -1
"""Token id marking padding in decoded token rows (never a real id)."""
IGNORE_INDEX = -100
"""Targets with this value are left out of the loss (torch's cross_entropy default)."""
MASK_COLUMN, POSITIONS_COLUMN = TOKEN_EXTRAS
"""Token data's optional columns, as `shardrun data prepare` writes them: per token, 1 where it is a target counted
in the loss; per token, its position in its document (packed rows)."""
ID_BITS = 32
"""Token rows with a loss mask or positions decode into one int64 per token: the id in the low 32 bits, 1 in bit
32 where the token is no target, its position above (encode_rows, decode_rows): the stream keeps handling one array
of rows, and gathers them as it does plain token rows."""


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
        self.encoded = spec.format == "tokens" and len(self.columns) > 1
        """Token rows carry a loss mask or positions (encode_rows)."""
        self.positions = POSITIONS_COLUMN in self.columns

    def _columns(self) -> list[str]:
        if self.spec.format == "tokens":
            return [self.spec.column] + [c for c in (MASK_COLUMN, POSITIONS_COLUMN) if c in self.index.schema]
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
                rows = token_rows(table.column(0), self.spec.seq_len + 1, self.vocab_size)
                if table.num_columns == 1:
                    return rows
                extra = {c: token_rows(table.column(c), self.spec.seq_len + 1, None, what=c)
                         for c in table.column_names[1:]}
                return encode_rows(rows, extra.get(MASK_COLUMN), extra.get(POSITIONS_COLUMN))
            return {c: column_array(c, table.column(c)) for c in self.columns}
        except ValueError as e:
            raise BadRowGroup(f"{self.index.describe(g)}: {e}") from None


def encode_rows(rows: np.ndarray, mask: np.ndarray | None, positions: np.ndarray | None) -> np.ndarray:
    """Token rows (PAD where short) with their loss mask and positions as one int64 array (see ID_BITS); PAD
    stays PAD."""
    out = rows.astype(np.int64)
    if mask is not None:
        out |= (mask == 0).astype(np.int64) << ID_BITS
    if positions is not None:
        if positions.size and positions.max() >= 1 << 30:
            raise ValueError(f"position_ids go up to {positions.max()}")
        out |= np.maximum(positions, 0).astype(np.int64) << (ID_BITS + 1)
    out[rows == PAD] = PAD
    return out


def decode_rows(t: torch.Tensor, *, positions: bool) -> dict[str, torch.Tensor]:
    """int64 token rows, encoded (encode_rows) or plain, PAD where short, as the model's batch: inputs, targets
    (IGNORE_INDEX for padding and tokens the loss mask leaves out) and, with positions, the inputs'
    position_ids."""
    pad = t < 0
    ids = (t & ((1 << ID_BITS) - 1)).masked_fill(pad, 0)
    ignored = pad | (((t >> ID_BITS) & 1) == 1)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:].masked_fill(ignored[:, 1:], IGNORE_INDEX)}
    if positions:
        batch["position_ids"] = (t[:, :-1] >> (ID_BITS + 1)).masked_fill(pad[:, :-1], 0)
    return batch


def token_rows(col: pa.ChunkedArray | pa.Array, row_len: int, vocab_size: int | None = None, *,
               what: str = "token ids") -> np.ndarray:
    """Token sequences as an (n, row_len) int32 array: longer rows cut, shorter ones padded with PAD; a
    ValueError for null rows or ids, and ids outside 0..vocab_size - 1 (`what`: the column's values, for
    messages)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.null_count:
        raise ValueError(f"{col.null_count} rows are null")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size < row_len:  # the index refuses such files: this one changed since it was built
            raise ValueError(f"rows hold {col.type.list_size} tokens, fewer than data.seq_len + 1 = {row_len}")
        values = _ints(col.flatten(), vocab_size, what)
        return values.reshape(n, col.type.list_size)[:, :row_len]  # a view: no copy for int32
    offsets = col.offsets.to_numpy()
    values = _ints(col.values, vocab_size, what)
    lengths = np.diff(offsets)
    if n and lengths.min() >= row_len:
        return values[offsets[:-1, None] + np.arange(row_len)]
    out = np.full((n, row_len), PAD, dtype=np.int32)
    mask = np.arange(row_len) < lengths[:, None]
    out[mask] = values[(offsets[:-1, None] + np.arange(row_len))[mask]]
    return out


def _ints(arr: pa.Array, vocab_size: int | None = None, what: str = "token ids") -> np.ndarray:
    if arr.null_count:  # numpy would make them NaN, then -2147483648
        raise ValueError(f"{arr.null_count} {what} inside the rows are null")
    values = arr.to_numpy(zero_copy_only=False)
    if not len(values):
        return values.astype(np.int32, copy=False)
    low, high = values.min(), values.max()
    limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
    if low < 0 or high >= limit:
        within = f"the model's vocabulary (0..{vocab_size - 1}, model.vocab_size)" if vocab_size is not None \
            else "0..2^31-1"
        raise ValueError(f"{what} range {low}..{high}, outside {within}")
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
