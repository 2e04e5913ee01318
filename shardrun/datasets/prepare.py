"""Turn text files into token Parquet shards (`shardrun data prepare-text`).

Two passes, each spread over a process pool when the input is large enough: contiguous slices of
the files are tokenized into one token stream (kept on disk, in file order, in pieces), then the
stream is cut into rows of seq_len + 1 tokens that overlap by one and written as shards of
rows_per_file rows. A file's tokens depend only on its own bytes and a shard only on its span of
the stream, so the output is the same byte for byte whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shardrun import fs
from shardrun.errors import UserError

ROWS_PER_FILE = 4096
ROWS_PER_ROW_GROUP = 512
# zstd: shards are written once and read every epoch by every node, often over the network
# (abfs://, s3://). On the stdlib corpus zstd files are 12% smaller than snappy's (dictionary
# encoding of the ids does most of the work) and read just as fast.
DEFAULT_COMPRESSION = "zstd"
COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip")
BYTE_VOCAB_SIZE = 256
DOCUMENT_SEPARATOR = b"\n\n"  # byte-level mode joins files with a blank line
# Appended after each document when the tokenizer has one, in this order of preference.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
# Below this much input per worker, starting a process costs more than it saves: a spawned
# worker takes about 0.5 s to start (numpy and pyarrow; shardrun.datasets imports torch lazily).
# One process turns about 20 MB of text a second into byte tokens, but BPE-encodes 1-2 MB a second.
MIN_BYTES_PER_WORKER = {"bytes": 16_000_000, "tokenizer": 2_000_000}
MAX_SLICE_BYTES = 64_000_000  # the text one task holds in memory at once
TASKS_PER_WORKER = 4  # smaller slices even out files of unequal size

META_TOKENIZER = b"shardrun.tokenizer"
META_VOCAB_SIZE = b"shardrun.vocab_size"
META_SEQ_LEN = b"shardrun.seq_len"
META_FORMAT = b"shardrun.format"
"""`shardrun data prepare`'s --format: text, prompt-completion or chat (prepare-text records none)."""
META_PACKED = b"shardrun.packed"
"""b"true" when a row may hold several documents (then position_ids restart at each), else b"false"."""
LOSS_MASK_COLUMN = "loss_mask"
"""Per token, 1 where the token is a target counted in the loss (`data prepare`'s shards)."""
POSITION_IDS_COLUMN = "position_ids"
"""Per token, its position within its document, written only for packed rows."""


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


def read_documents(files: list[Path], max_bytes: int | None = None,
                   separator: bytes = b"") -> Iterator[bytes]:
    """Each file's bytes followed by separator, stopping once max_bytes have been given."""
    total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            return
        try:
            data = f.read_bytes() + separator
        except OSError as e:
            raise UserError(f"{f}: cannot read it ({e.strerror})") from None
        if max_bytes is not None:
            data = data[: max_bytes - total]
        total += len(data)
        yield data


def read_corpus(files: list[Path], max_bytes: int | None = None) -> bytes:
    """The files' bytes, joined by a blank line, stopping at max_bytes."""
    return b"".join(read_documents(files, max_bytes, DOCUMENT_SEPARATOR))


def token_rows(tokens: bytes | np.ndarray, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens (bytes: byte tokens); consecutive rows overlap by one so no target is lost."""
    if isinstance(tokens, bytes):
        tokens = np.frombuffer(tokens, dtype=np.uint8)
    n_rows = (len(tokens) - 1) // seq_len
    if n_rows < 1:
        raise UserError(f"the text makes {len(tokens)} tokens, too few for one row of {seq_len + 1}")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return np.ascontiguousarray(windows[: n_rows * seq_len : seq_len], dtype=np.int32)


def read_vocab_size(schema_metadata: dict[bytes, bytes] | None) -> int | None:
    """The vocabulary size prepare-text recorded in a Parquet schema's metadata; None if absent."""
    raw = (schema_metadata or {}).get(META_VOCAB_SIZE)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"Parquet metadata {META_VOCAB_SIZE.decode()} is {raw!r}, not an integer") from None


@dataclass(frozen=True, kw_only=True)
class ShardLayout:
    """How token rows become Parquet files; checked when made."""

    seq_len: int
    """Tokens per training sequence; each row holds seq_len + 1."""
    rows_per_file: int = ROWS_PER_FILE
    """Rows in each part-NNNNN.parquet (the last file holds the rest)."""
    row_group_rows: int = ROWS_PER_ROW_GROUP
    """Rows in each row group, the unit the data plan deals to ranks (at most rows_per_file)."""
    compression: str = DEFAULT_COMPRESSION
    """Parquet compression codec, one of COMPRESSIONS."""

    def __post_init__(self) -> None:
        for flag, value in (("--seq-len", self.seq_len), ("--rows-per-file", self.rows_per_file),
                            ("--row-group-rows", self.row_group_rows)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value})")
        if self.compression not in COMPRESSIONS:
            raise UserError(f"--compression must be one of {', '.join(COMPRESSIONS)} "
                            f"(got {self.compression!r})")


@dataclass(frozen=True)
class TextEncoder:
    """Text to token ids: raw bytes, or a Hugging Face tokenizers tokenizer.json."""

    name: str
    """'bytes', or the tokenizer file's name and sha256 (recorded in every shard)."""
    vocab_size: int
    tokenizer_path: Path | None = None
    end_of_text: int | None = None
    """Token id appended after each document, if the tokenizer has one."""

    @classmethod
    def load(cls, tokenizer: str | Path | None) -> TextEncoder:
        """The byte-level encoder for None, else the tokenizer.json at that path, checked."""
        if tokenizer is None:
            return cls(name="bytes", vocab_size=BYTE_VOCAB_SIZE)
        path = Path(tokenizer).resolve()
        if not path.is_file():
            raise UserError(f"--tokenizer {tokenizer}: no such file")
        tok = _load_tokenizer(path)
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if vocab_size - 1 > np.iinfo(np.int32).max:
            raise UserError(f"--tokenizer {tokenizer}: {vocab_size} token ids do not fit int32")
        ids = (tok.token_to_id(t) for t in END_OF_TEXT_TOKENS)
        return cls(name=tokenizer_name(path), vocab_size=vocab_size, tokenizer_path=path,
                   end_of_text=next((i for i in ids if i is not None), None))

    @property
    def kind(self) -> str:
        """'bytes' or 'tokenizer'."""
        return "tokenizer" if self.tokenizer_path else "bytes"

    @property
    def input_separator(self) -> bytes:
        """What joins documents in the byte stream that max_bytes counts."""
        return b"" if self.tokenizer_path else DOCUMENT_SEPARATOR

    def encode(self, files: list[Path], max_bytes: int) -> np.ndarray:
        """The token ids of these files in order, reading max_bytes of them (bytes stay uint8)."""
        if self.tokenizer_path is None:
            return np.frombuffer(read_corpus(files, max_bytes), dtype=np.uint8)
        tok = _load_tokenizer(self.tokenizer_path)
        tail = [] if self.end_of_text is None else [self.end_of_text]
        parts = []
        for doc in read_documents(files, max_bytes):
            # A max_bytes cut can split a character; the replacement character marks it.
            text = doc.decode("utf-8", errors="replace")
            if text:
                ids = tok.encode(text, add_special_tokens=False).ids + tail
                parts.append(np.asarray(ids, dtype=np.int32))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


BYTES_SAMPLE = "def f(x):\n\t\"\"\"Ünïcode — ok.\"\"\"\r\n\x00\x7f"
"""Text a byte tokenizer turns into its exact UTF-8 bytes."""


def tokenizer_name(file: Path) -> str:
    """How data and models name a tokenizer.json: `bytes` for one whose ids are the text's UTF-8 bytes (the
    byte-level GPT's, exported in the Hugging Face format), as data made without a tokenizer is named; else
    `<file name> sha256:<digest of the file>`."""
    tok = _load_tokenizer(file)
    if tok.get_vocab_size() == BYTE_VOCAB_SIZE and \
            tok.encode(BYTES_SAMPLE, add_special_tokens=False).ids == list(BYTES_SAMPLE.encode()):
        return "bytes"
    return f"{file.name} sha256:{hashlib.sha256(file.read_bytes()).hexdigest()}"


@lru_cache(maxsize=2)
def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("--tokenizer needs the Hugging Face tokenizers library: "
                        "pip install 'shardrun[tokenizers]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any malformed file
        raise UserError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({e})") from None


@dataclass(frozen=True)
class EncodeTask:
    """Tokenize a contiguous slice of the files into one .npy piece of the stream."""

    encoder: TextEncoder
    files: tuple[Path, ...]
    max_bytes: int
    piece: Path


@dataclass(frozen=True)
class ShardTask:
    """Write the rows cut from stream tokens [start, stop) as one Parquet file."""

    pieces: tuple[tuple[Path, int], ...]
    start: int
    stop: int
    path: Path
    layout: ShardLayout
    metadata: dict[bytes, bytes]


def prepare_text(sources: list[str | Path], out_dir: Path, seq_len: int, max_bytes: int | None = None, *,
                 tokenizer: str | Path | None = None, rows_per_file: int = ROWS_PER_FILE,
                 row_group_rows: int = ROWS_PER_ROW_GROUP, compression: str = DEFAULT_COMPRESSION,
                 workers: int | None = None) -> list[Path]:
    """Text files to token shards in out_dir: byte-level, or with a tokenizer.json."""
    layout = ShardLayout(seq_len=seq_len, rows_per_file=rows_per_file, row_group_rows=row_group_rows,
                         compression=compression)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    encoder = TextEncoder.load(tokenizer)
    return _prepare(expand_sources(sources), Path(out_dir), layout, encoder, max_bytes, workers)


def prepare_stdlib(out_dir: Path, seq_len: int, max_bytes: int, **options) -> list[Path]:
    """The demo corpus: this Python's standard library as token shards (options as prepare_text)."""
    return prepare_text(stdlib_sources(), out_dir, seq_len, max_bytes, **options)


def _prepare(files: list[Path], out_dir: Path, layout: ShardLayout, encoder: TextEncoder,
             max_bytes: int | None, workers: int) -> list[Path]:
    sizes = _input_sizes(files, max_bytes, encoder.input_separator)
    total = sum(size for _, size in sizes)
    workers = max(1, min(workers, total // MIN_BYTES_PER_WORKER[encoder.kind]))
    slices = _slices(sizes, max(workers * TASKS_PER_WORKER, math.ceil(total / MAX_SLICE_BYTES)))
    with staging_dir(out_dir) as staging, task_runner(workers) as run_all:
        stream = staging / ".tokens"
        stream.mkdir()
        encode = [EncodeTask(encoder, tuple(f for f, _ in s), sum(n for _, n in s), stream / f"piece-{i:05d}.npy")
                  for i, s in enumerate(slices)]
        pieces = tuple(zip([t.piece for t in encode], run_all(_encode_slice, encode, "tokenizing"), strict=True))
        run_all(_write_shard, _shard_tasks(pieces, staging, layout, encoder), "writing shards")
        shutil.rmtree(stream)
    return sorted(out_dir.glob("*.parquet"))


def _shard_tasks(pieces: tuple[tuple[Path, int], ...], staging: Path, layout: ShardLayout,
                 encoder: TextEncoder) -> list[ShardTask]:
    """One task per file of rows_per_file rows, each row starting seq_len tokens after the last."""
    n_tokens = sum(n for _, n in pieces)
    n_rows = (n_tokens - 1) // layout.seq_len
    if n_rows < 1:
        raise UserError(f"the text makes {n_tokens} tokens, too few for one row of {layout.seq_len + 1}")
    metadata = {META_TOKENIZER: encoder.name.encode(), META_VOCAB_SIZE: str(encoder.vocab_size).encode(),
                META_SEQ_LEN: str(layout.seq_len).encode()}
    firsts = range(0, n_rows, layout.rows_per_file)
    return [ShardTask(pieces, first * layout.seq_len, min(first + layout.rows_per_file, n_rows) * layout.seq_len + 1,
                      staging / f"part-{i:05d}.parquet", layout, metadata) for i, first in enumerate(firsts)]


def _input_sizes(files: list[Path], max_bytes: int | None, separator: bytes) -> list[tuple[Path, int]]:
    """(file, bytes it gives the stream) for the files max_bytes reaches, the last one possibly cut."""
    sizes, total = [], 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            size = f.stat().st_size + len(separator)
        except OSError as e:
            raise UserError(f"{f}: cannot read it ({e.strerror})") from None
        if max_bytes is not None:
            size = min(size, max_bytes - total)
        sizes.append((f, size))
        total += size
    return sizes


def _slices(sizes: list[tuple[Path, int]], n: int) -> list[list[tuple[Path, int]]]:
    """About n contiguous runs of files of about equal bytes."""
    target = sum(size for _, size in sizes) / n
    slices, current, filled = [], [], 0
    for f, size in sizes:
        current.append((f, size))
        filled += size
        if filled >= target * (len(slices) + 1):
            slices.append(current)
            current = []
    return slices + [current] if current else slices


def _encode_slice(task: EncodeTask) -> int:
    tokens = task.encoder.encode(list(task.files), task.max_bytes)
    np.save(task.piece, tokens)
    return len(tokens)


def _write_shard(task: ShardTask) -> None:
    rows = token_rows(read_span(task.pieces, task.start, task.stop), task.layout.seq_len)
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.int32()), rows.shape[1])
    table = pa.table({"tokens": column}).replace_schema_metadata(task.metadata)
    pq.write_table(table, task.path, row_group_size=task.layout.row_group_rows,
                   compression=task.layout.compression)


def read_span(pieces: tuple[tuple[Path, int], ...], start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream that the pieces hold in order."""
    parts, offset = [], 0
    for path, length in pieces:
        lo, hi = max(start, offset), min(stop, offset + length)
        if lo < hi:
            parts.append(np.load(path, mmap_mode="r")[lo - offset : hi - offset])
        offset += length
    return np.concatenate(parts)


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside out_dir, renamed to it when done, removed on any failure."""
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        fs.follow_umask(staging)  # mkdtemp made it 0700: shared storage needs the modes other folders get
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def task_runner(workers: int) -> Iterator[Callable[..., list]]:
    """A map over tasks, results in order: in this process for one worker, else in a process pool. Given a
    `progress` label, a bar counts finished tasks on stderr, only when stderr is a terminal."""
    pool = None
    if workers > 1:
        # spawn, not fork: a forked child would inherit the parent's threads' locks (tokenizers, Arrow)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def run_all(fn: Callable, tasks: list, progress: str | None = None) -> list:
        with tqdm(total=len(tasks), desc=progress, unit="task", leave=False,
                  disable=progress is None or not sys.stderr.isatty()) as bar:
            if pool is None:
                return [_counted(fn(t), bar) for t in tasks]
            futures = [pool.submit(fn, t) for t in tasks]
            for future in as_completed(futures):
                future.result()  # the first failure ends the run (the pool's shutdown cancels the rest)
                bar.update(1)
            return [f.result() for f in futures]

    try:
        yield run_all
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _counted(result, bar):
    bar.update(1)
    return result


@dataclass(frozen=True)
class ShardSummary:
    """What a prepare wrote, read back from the Parquet footers."""

    files: int
    rows: int
    tokens: int
    """Distinct stream positions the rows cover: rows * seq_len + 1."""
    bytes_on_disk: int


def shard_count(n: int) -> str:
    """"1 Parquet shard", "3 Parquet shards"."""
    return f"{n} Parquet shard{'' if n == 1 else 's'}"


def summarize(files: list[Path]) -> ShardSummary:
    """Files, rows, tokens and bytes on disk of shards this module wrote."""
    metas = [pq.read_metadata(f) for f in files]
    rows = sum(m.num_rows for m in metas)
    seq_len = int(metas[0].schema.to_arrow_schema().metadata[META_SEQ_LEN])
    return ShardSummary(files=len(files), rows=rows, tokens=rows * seq_len + 1,
                        bytes_on_disk=sum(f.stat().st_size for f in files))
