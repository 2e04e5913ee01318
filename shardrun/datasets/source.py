"""Parquet sources: list the files behind local paths or URIs, read token columns, name bad files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardrun.errors import UserError


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's native filesystem for a local path or a URI (abfs://, s3://, ...)."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise UserError(f"{path}: cannot open this storage location ({e})") from None
    return pafs.LocalFileSystem(), path


def list_parquet(paths: list[str]) -> list[tuple[pafs.FileSystem, str]]:
    """Every Parquet file under the given files or directories, in a stable order."""
    files = []
    for path in paths:
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"data.paths: {path} does not exist")
        if info.type == pafs.FileType.File:
            files.append((fs, root))
            continue
        found = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        )
        if not found:
            raise UserError(f"data.paths: {path} holds no .parquet files")
        files.extend((fs, f) for f in found)
    return files


def read_token_rows(paths: list[str], column: str, row_len: int) -> np.ndarray:
    """All rows of `column` as an int32 array (rows, row_len); longer rows are cut to row_len."""
    parts = [_read_file(fs, path, column, row_len) for fs, path in list_parquet(paths)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _read_file(fs: pafs.FileSystem, path: str, column: str, row_len: int) -> np.ndarray:
    try:
        table = pq.read_table(path, columns=[column], filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: cannot read column {column!r} as Parquet: {e}") from None
    col = table.column(column).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)) or not pa.types.is_integer(col.type.value_type):
        raise UserError(f"{path}: column {column!r} is {col.type}, expected a list of integers")
    if col.null_count:
        raise UserError(f"{path}: column {column!r} has {col.null_count} null rows")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return np.empty((0, row_len), dtype=np.int32)
    if lengths.min() != lengths.max():
        raise UserError(
            f"{path}: rows of column {column!r} have {lengths.min()} to {lengths.max()} tokens; "
            "shardrun expects rows of one length (shardrun data prepare-text writes them)"
        )
    if lengths[0] < row_len:
        raise UserError(
            f"{path}: rows hold {lengths[0]} tokens, fewer than data.seq_len + 1 = {row_len}"
        )
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values.reshape(len(col), lengths[0])[:, :row_len]
