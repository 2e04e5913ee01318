"""Turn text files into byte-level token Parquet shards (`shardrun data prepare-text`)."""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrun.errors import UserError

ROWS_PER_FILE = 4096
ROWS_PER_ROW_GROUP = 512


def stdlib_sources() -> list[Path]:
    """This Python's standard-library source files, in a stable order (real text on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def expand_sources(sources: list[str | Path]) -> list[Path]:
    """Files as given, directories as the sorted text files below them."""
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            files.extend(sorted(p for p in src.rglob("*") if p.is_file()))
        elif src.is_file():
            files.append(src)
        else:
            raise UserError(f"{src}: no such file or directory")
    if not files:
        raise UserError(f"no text files in {', '.join(map(str, sources))}")
    return files


def read_corpus(files: list[Path], max_bytes: int | None = None) -> bytes:
    """The files' bytes, joined by a blank line, stopping at max_bytes."""
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes() + b"\n\n"
        if max_bytes is not None and total + len(data) > max_bytes:
            chunks.append(data[: max_bytes - total])
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def token_rows(corpus: bytes, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 byte tokens; consecutive rows overlap by one so no target is lost."""
    tokens = np.frombuffer(corpus, dtype=np.uint8).astype(np.int32)
    n_rows = (len(tokens) - 1) // seq_len
    if n_rows < 1:
        raise UserError(f"the text holds {len(tokens)} bytes, too few for one row of {seq_len + 1}")
    starts = np.arange(n_rows) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)]


def write_shards(rows: np.ndarray, out_dir: Path, column: str = "tokens") -> list[Path]:
    """Parquet files of ROWS_PER_FILE rows each, written to a temporary folder then moved in whole."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        row_len = rows.shape[1]
        for i, start in enumerate(range(0, len(rows), ROWS_PER_FILE)):
            chunk = rows[start : start + ROWS_PER_FILE]
            values = pa.array(chunk.reshape(-1), type=pa.int32())
            col = pa.FixedSizeListArray.from_arrays(values, row_len)
            table = pa.table({column: col})
            pq.write_table(table, staging / f"part-{i:05d}.parquet",
                           row_group_size=ROWS_PER_ROW_GROUP)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(out_dir.glob("*.parquet"))


def prepare_text(sources: list[str | Path], out_dir: Path, seq_len: int,
                 max_bytes: int | None = None) -> list[Path]:
    """Text files to byte-level token shards in out_dir."""
    corpus = read_corpus(expand_sources(sources), max_bytes)
    return write_shards(token_rows(corpus, seq_len), out_dir)


def prepare_stdlib(out_dir: Path, seq_len: int, max_bytes: int) -> list[Path]:
    """The demo corpus: this Python's standard library as byte-level token shards."""
    corpus = read_corpus(stdlib_sources(), max_bytes)
    return write_shards(token_rows(corpus, seq_len), out_dir)
