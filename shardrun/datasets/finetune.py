"""Documents to loss-masked token shards (`shardrun data prepare`): text, prompt/completion pairs or chats.

Each input is read as records (a text file is one document; a JSONL line or a Parquet row is one record), each
record becomes one document: token ids and a loss mask (1 where the token is a target counted in the loss). Two
passes over a process pool: contiguous parts of the inputs are tokenized into one token stream on disk, in input
order; then the documents are packed greedily, in order, into rows of seq_len + 1 tokens and written as shards.
A document's tokens depend only on its record and the packing only on the documents' lengths, so the output is
the same byte for byte whatever the number of workers. With a held-out share, a hash of each document's token ids
sends it to the training or the held-out split (duplicates together), and each split is packed on its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrun.datasets.prepare import (
    DEFAULT_COMPRESSION,
    END_OF_TEXT_TOKENS,
    LOSS_MASK_COLUMN,
    META_FORMAT,
    META_PACKED,
    META_SEQ_LEN,
    META_TOKENIZER,
    META_VOCAB_SIZE,
    POSITION_IDS_COLUMN,
    ROWS_PER_FILE,
    ROWS_PER_ROW_GROUP,
    TASKS_PER_WORKER,
    ShardLayout,
    read_span,
    shard_count,
    staging_dir,
    task_runner,
    tokenizer_name,
)
from shardrun.errors import UserError

FORMATS = ("text", "prompt-completion", "chat")
ON_BAD_RECORD = ("fail", "skip")
BAD_RECORDS_NAMED = 5  # under skip, the summary names this many and counts the rest
# Below this much input per worker, starting a process (it imports transformers: about 2 s) costs more than it
# saves; chat templates and the tokenizer's Python wrapper encode about 1 MB a second.
MIN_BYTES_PER_WORKER = 2_000_000
MIN_BYTES_PER_BATCHED_WORKER = 256_000_000
"""The same for text and prompt/completion records with a fast tokenizer: its encode_batch already runs on every
core of one process (measured: 32 MB of JSONL on 2 cores took 7.2 s in one process, 10.6 s in two), so more
processes pay off only where reading the records and writing the shards weigh."""
MAX_PART_BYTES = 32_000_000  # the input one task reads at once
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIX = ".parquet"
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
MAX_HELD_OUT = 0.5  # a larger share is most likely a mistake: more documents to evaluate than to train on
HELD_OUT_SUFFIX = "-eval"  # the default held-out folder is --out's name with this after it


class BadRecord(Exception):
    """A record that cannot become a document; the message says why."""


@dataclass(frozen=True, kw_only=True)
class RecordFormat:
    """What a record is and which of its tokens count in the loss; checked when made."""

    kind: str = "text"
    """One of FORMATS."""
    text_field: str = "text"
    """The JSONL key or Parquet column holding a text document."""
    prompt_field: str = "prompt"
    """prompt-completion: the key of the prompt (no loss)."""
    completion_field: str = "completion"
    """prompt-completion: the key of the completion (in the loss, with the EOS after it)."""
    messages_field: str = "messages"
    """chat: the key of the list of {role, content} messages (loss on the assistant's turns)."""

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {self.kind!r})")

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields a record of this format needs."""
        return {"text": (self.text_field,), "prompt-completion": (self.prompt_field, self.completion_field),
                "chat": (self.messages_field,)}[self.kind]


@dataclass(frozen=True)
class DocumentTokenizer:
    """A Hugging Face tokenizer (folder or tokenizer.json) and the ids documents are built with."""

    path: Path
    name: str
    """The tokenizer.json's file name and sha256, as prepare-text and the model check name it."""
    vocab_size: int
    eos_id: int | None
    """Appended after a text document and after a completion, if the tokenizer has one."""
    bos_id: int | None
    """Put before a text document or a prompt, if the tokenizer has one distinct from its EOS."""
    pad_id: int
    """Fills the rest of a row (loss mask 0): the tokenizer's pad id, else 0."""

    @classmethod
    def load(cls, tokenizer: str | Path, *, needs_chat_template: bool = False) -> DocumentTokenizer:
        """The tokenizer at that path (a folder save_pretrained wrote, or a tokenizer.json), checked."""
        path = Path(tokenizer).resolve()
        if not path.exists():
            raise UserError(f"--tokenizer {tokenizer}: no such file or folder")
        tok = _hf_tokenizer(path)
        if needs_chat_template and not getattr(tok, "chat_template", None):
            raise UserError(f"--tokenizer {tokenizer}: it has no chat template, which --format chat renders "
                            "conversations with; give the model's tokenizer folder (tokenizer_config.json or "
                            "chat_template.jinja holds the template)")
        vocab_size = max(tok.get_vocab().values(), default=-1) + 1
        if vocab_size - 1 > np.iinfo(np.int32).max:
            raise UserError(f"--tokenizer {tokenizer}: {vocab_size} token ids do not fit int32")
        eos = tok.eos_token_id
        if eos is None:
            eos = next((i for i in map(tok.convert_tokens_to_ids, END_OF_TEXT_TOKENS)
                        if i is not None and i != tok.unk_token_id), None)
        bos = tok.bos_token_id if tok.bos_token_id != eos else None
        return cls(path=path, name=_tokenizer_name(path, tok), vocab_size=vocab_size, eos_id=eos, bos_id=bos,
                   pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)

    @property
    def hf(self):
        """The transformers tokenizer (loaded once per process)."""
        return _hf_tokenizer(self.path)


def _tokenizer_name(path: Path, tok) -> str:
    """The tokenizer.json's name (the folder's, for a folder: prepare.tokenizer_name, `bytes` for a byte
    tokenizer); for a folder without one, the folder's name and the digest of the tokenizer transformers
    converted."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        return tokenizer_name(file)
    return f"{path.name} sha256:{hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()}"


@lru_cache(maxsize=2)
def _hf_tokenizer(path: Path):
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise UserError("shardrun data prepare needs the transformers library: pip install 'shardrun[hf]'") from None
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # transformers and tokenizers raise many kinds for a malformed tokenizer
        raise UserError(f"--tokenizer {path}: not a Hugging Face tokenizer folder or tokenizer.json "
                        f"({type(e).__name__}: {e})") from None


def encode_record(tok: DocumentTokenizer, fmt: RecordFormat, record) -> tuple[list[int], list[int]]:
    """One record's token ids and loss mask (a text file's record is its text); BadRecord says why not."""
    [result] = encode_records(tok, fmt, [record])
    if isinstance(result, BadRecord):
        raise result
    return result


ENCODE_BATCH = 256
"""Records tokenized together: text and prompt/completion records go through a fast tokenizer's encode_batch (its
Rust loop over the batch, on every core, not one Python call per text)."""


def encode_records(tok: DocumentTokenizer, fmt: RecordFormat, records: list) -> list:
    """Each record's (ids, mask), or the BadRecord it is (a record may be one already: a line that is no JSON),
    in order. A text document: BOS (if any), its text, EOS (if any), all in the loss; a prompt and completion: the
    completion and the EOS after it in the loss; a chat: the assistant's turns (chat_tokens)."""
    if fmt.kind == "chat":
        return [_chat(tok, fmt, record) for record in records]
    texts, out = [], []
    for record in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            if fmt.kind == "text":
                text = record if isinstance(record, str) else _field(record, fmt.text_field)
                if not text:
                    raise BadRecord("empty text")
                out.append(len(texts))
                texts.append(text)
            else:
                prompt, completion = _field(record, fmt.prompt_field), _field(record, fmt.completion_field)
                if not completion.strip():
                    raise BadRecord(f"empty {fmt.completion_field!r}")
                out.append(len(texts))
                texts += [prompt, completion]
        except BadRecord as e:
            out.append(e)
    encoded = _encode_texts(tok.hf, texts)
    head, tail = _head(tok), _tail(tok)
    results = []
    for item in out:
        if isinstance(item, BadRecord):
            results.append(item)
        elif fmt.kind == "text":
            ids = head + encoded[item] + tail
            results.append((ids, [1] * len(ids)))
        else:
            first, body = head + encoded[item], encoded[item + 1] + tail
            results.append((first + body, [0] * len(first) + [1] * len(body)))
    return results


def _encode_texts(hf, texts: list[str]) -> list[list[int]]:
    """Each text's ids, no special tokens: a fast tokenizer's encode_batch, else its encode one by one."""
    if not texts:
        return []
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [hf.encode(text, add_special_tokens=False) for text in texts]


def _chat(tok: DocumentTokenizer, fmt: RecordFormat, record):
    try:
        if isinstance(record, BadRecord):
            raise record
        return chat_tokens(tok.hf, _messages(record, fmt.messages_field))
    except BadRecord as e:
        return e


def _head(tok: DocumentTokenizer) -> list[int]:
    return [] if tok.bos_id is None else [tok.bos_id]


def _tail(tok: DocumentTokenizer) -> list[int]:
    return [] if tok.eos_id is None else [tok.eos_id]


def _field(record, name: str) -> str:
    if not isinstance(record, dict):
        raise BadRecord(f"a {type(record).__name__}, not an object with field {name!r}")
    if record.get(name) is None:
        raise BadRecord(f"no field {name!r}")
    if not isinstance(record[name], str):
        raise BadRecord(f"field {name!r} is a {type(record[name]).__name__}, not a string")
    return record[name]


def _messages(record, name: str) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get(name), list):
        raise BadRecord(f"no list of messages in field {name!r}")
    messages = record[name]
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            raise BadRecord(f"message {i} of {name!r} is not an object with a role and a content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn (nothing to learn from)")
    return messages


def chat_tokens(hf, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation's tokens as the chat template renders it, and 1 on the assistant's turns.

    A template that marks the assistant's text with {% generation %} says itself which tokens are the assistant's.
    Otherwise each assistant turn is what rendering messages[:i + 1] adds to messages[:i] with the generation
    prompt (the assistant header stays out of the loss; the end-of-turn tokens count), checked to be prefixes of
    the whole rendering, so the tokens are always exactly apply_chat_template's.
    """
    try:
        if _GENERATION_BLOCK.search(hf.chat_template or ""):
            out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if not any(mask):
                raise BadRecord("the chat template's {% generation %} blocks mark no token of the assistant's turns")
            return ids, mask
        ids = _render(hf, messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, stop = _turn_span(hf, messages, i, ids)
                mask[start:stop] = [1] * (stop - start)
    except BadRecord:
        raise
    except Exception as e:  # Jinja raises whatever the template says (e.g. "roles must alternate")
        raise BadRecord(f"the chat template refused it ({type(e).__name__}: {e})") from None
    return ids, mask


def _turn_span(hf, messages: list[dict], i: int, ids: list[int]) -> tuple[int, int]:
    """Where messages[i]'s turn lies in the whole rendering `ids`."""
    after = _render(hf, messages[: i + 1])
    if ids[: len(after)] != after:
        raise BadRecord(f"the chat template renders message {i + 1} differently once later messages follow, so "
                        "its tokens cannot be told apart; use a template with {% generation %} blocks")
    if not i:
        return 0, len(after)
    candidates = (_render(hf, messages[:i], add_generation_prompt=True), _render(hf, messages[:i]))
    before = next((c for c in candidates if after[: len(c)] == c), None)
    if before is None:
        raise BadRecord(f"the chat template renders the messages before message {i + 1} differently once it "
                        "follows, so its tokens cannot be told apart; use a template with {% generation %} blocks")
    return len(before), len(after)


def _render(hf, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                       add_generation_prompt=add_generation_prompt))


@dataclass(frozen=True)
class InputPart:
    """A contiguous part of one input: a whole text file or .jsonl.gz, a byte range of a .jsonl (starting at
    line first_line), or a range of a Parquet file's row groups."""

    path: Path
    kind: str
    """'text', 'jsonl' or 'parquet'."""
    start: int = 0
    stop: int = -1
    first_line: int = 1
    size: int = 0
    """Bytes it holds (compressed for .gz and Parquet), to even out the tasks."""


def input_kind(path: Path) -> str:
    """'jsonl', 'parquet' or 'text', by the file's name."""
    if path.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if path.name.endswith(PARQUET_SUFFIX) else "text"


def input_parts(sources: list[str | Path], part_bytes: int | None = None) -> list[InputPart]:
    """The inputs (files, and the files below folders in name order) as parts of at most about part_bytes
    (default MAX_PART_BYTES)."""
    part_bytes = part_bytes or MAX_PART_BYTES
    parts = []
    for src in sources:
        if "://" in str(src):
            raise UserError(f"{src}: shardrun data prepare reads local files only; copy the input here first")
        src = Path(src)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif src.is_file():
            files = [src]
        else:
            raise UserError(f"{src}: no such file or directory")
        for f in files:
            parts.extend(_file_parts(f, input_kind(f), part_bytes))
    if not parts:
        raise UserError(f"no input files in {', '.join(map(str, sources))}")
    return parts


def _file_parts(path: Path, kind: str, part_bytes: int) -> list[InputPart]:
    try:
        if kind == "parquet":
            meta = pq.read_metadata(path)
            return [InputPart(path, kind, g, g + 1, size=meta.row_group(g).total_byte_size)
                    for g in range(meta.num_row_groups)]
        size = path.stat().st_size
        if kind == "text" or path.name.endswith(".gz") or size <= part_bytes:
            return [InputPart(path, kind, 0, size, size=size)]
        return _jsonl_parts(path, size, part_bytes)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except pa.ArrowInvalid as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None


def _jsonl_parts(path: Path, size: int, part_bytes: int) -> list[InputPart]:
    """Byte ranges of about part_bytes that end at a line's end, each with the number of its first line."""
    parts, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            chunk = f.read(part_bytes) + f.readline()
            parts.append(InputPart(path, "jsonl", start, start + len(chunk), line, size=len(chunk)))
            start += len(chunk)
            line += chunk.count(b"\n")
    return parts


def read_records(part: InputPart, fmt: RecordFormat) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of the part, where being `file:line` (`file row N` in Parquet); a record
    that cannot be parsed comes as a BadRecord."""
    if part.kind == "text":
        yield str(part.path), part.path.read_bytes().decode("utf-8", errors="replace")
    elif part.kind == "jsonl":
        yield from _jsonl_records(part)
    else:
        yield from _parquet_records(part, fmt)


def _jsonl_records(part: InputPart) -> Iterator[tuple[str, object]]:
    if part.path.name.endswith(".gz"):
        with gzip.open(part.path, "rb") as f:
            data = f.read()
    else:
        with open(part.path, "rb") as f:
            f.seek(part.start)
            data = f.read(part.stop - part.start)
    for n, line in enumerate(data.split(b"\n"), part.first_line):
        if line.strip():
            try:
                yield f"{part.path}:{n}", json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                yield f"{part.path}:{n}", BadRecord(f"not valid JSON ({e})")


def _parquet_records(part: InputPart, fmt: RecordFormat) -> Iterator[tuple[str, object]]:
    file = pq.ParquetFile(part.path)
    missing = [f for f in fmt.fields if f not in file.schema_arrow.names]
    if missing:
        raise UserError(f"{part.path}: no column {missing[0]!r} (it has {', '.join(file.schema_arrow.names)}); "
                        "name the column with --text-field, --prompt-field, --completion-field or --messages-field")
    first_row = sum(file.metadata.row_group(g).num_rows for g in range(part.start))
    rows = file.read_row_groups(list(range(part.start, part.stop)), columns=list(fmt.fields)).to_pylist()
    for n, row in enumerate(rows, first_row):
        yield f"{part.path} row {n}", row


@dataclass(frozen=True)
class StreamPiece:
    """One task's part of a split's token stream: token ids and loss mask as .npy files."""

    tokens: Path
    mask: Path


@dataclass(frozen=True)
class EncodeTask:
    """Tokenize a contiguous run of input parts into one piece of each split's stream."""

    tokenizer: DocumentTokenizer
    fmt: RecordFormat
    parts: tuple[InputPart, ...]
    pieces: tuple[StreamPiece, ...]
    """The training split's piece, then the held-out split's (with held_out only)."""
    stop_at_bad: bool
    held_out: float = 0.0
    """The share of documents held out (is_held_out), 0 for none."""


@dataclass
class EncodeResult:
    """What one EncodeTask made: its documents' lengths in each split, and its bad records (the first few named)."""

    doc_lens: list[np.ndarray] = field(default_factory=list)
    """One array per piece of the task."""
    bad: int = 0
    named: list[tuple[str, str]] = field(default_factory=list)
    """(where, why) of the first BAD_RECORDS_NAMED bad records."""


def is_held_out(ids: np.ndarray, share: float) -> bool:
    """Whether a document goes to the held-out split: the first 8 bytes of the sha256 of its token ids (int32,
    little-endian), as a fraction of 2**64, below the share. It depends on the document alone, so the split is the
    same for any --workers and input order, and identical documents never straddle it."""
    digest = hashlib.sha256(ids.astype("<i4", copy=False).tobytes()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def _encode_task(task: EncodeTask) -> EncodeResult:
    splits = [([], [], []) for _ in task.pieces]  # ids, masks, lengths of each split's documents
    result = EncodeResult()
    for part in task.parts:
        for batch in _batches(read_records(part, task.fmt), ENCODE_BATCH):
            for (where, _), encoded in zip(batch, encode_records(task.tokenizer, task.fmt, [r for _, r in batch]),
                                           strict=True):
                if isinstance(encoded, BadRecord):
                    result.bad += 1
                    if len(result.named) < BAD_RECORDS_NAMED:
                        result.named.append((where, str(encoded)))
                    if task.stop_at_bad:
                        return _save(task, splits, result)
                    continue
                doc_ids, doc_mask = encoded
                ids = np.asarray(doc_ids, dtype=np.int32)
                held = task.held_out > 0 and is_held_out(ids, task.held_out)
                split_ids, masks, lens = splits[1 if held else 0]
                split_ids.append(ids)
                masks.append(np.asarray(doc_mask, dtype=np.int8))
                lens.append(len(doc_ids))
    return _save(task, splits, result)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save(task: EncodeTask, splits: list[tuple[list, list, list]], result: EncodeResult) -> EncodeResult:
    for piece, (ids, masks, lens) in zip(task.pieces, splits, strict=True):
        np.save(piece.tokens, np.concatenate(ids) if ids else np.empty(0, dtype=np.int32))
        np.save(piece.mask, np.concatenate(masks) if masks else np.empty(0, dtype=np.int8))
        result.doc_lens.append(np.asarray(lens, dtype=np.int64))
    return result


@dataclass(frozen=True)
class Packing:
    """Where each segment of the stream goes: segment k is stream tokens [start[k], start[k] + length[k]) at
    columns [column[k], ...) of row row[k]. A segment is a document, or a piece of one longer than a row."""

    start: np.ndarray
    length: np.ndarray
    row: np.ndarray
    column: np.ndarray
    rows: int
    cut: int
    """Documents longer than a row, cut into pieces."""


def pack(doc_lens: np.ndarray, row_len: int, packed: bool = True) -> Packing:
    """Documents in order into rows of row_len tokens: greedily, each into the current row if it fits, else into
    a new one (packed=False: one per row). A document longer than a row is cut into pieces of row_len tokens that
    overlap by one, so every target keeps its token before it; its last piece packs like a document."""
    starts = (np.cumsum(doc_lens) - doc_lens).astype(np.int64)  # also right for no documents
    seg_start, seg_len, seg_row, seg_col = [], [], [], []
    row, column, cut = -1, row_len, 0
    for doc_start, doc_len in zip(starts.tolist(), doc_lens.tolist(), strict=True):
        cut += doc_len > row_len
        offset = 0
        while True:
            n = min(row_len, doc_len - offset)
            if not packed or column + n > row_len:
                row, column = row + 1, 0
            seg_start.append(doc_start + offset)
            seg_len.append(n)
            seg_row.append(row)
            seg_col.append(column)
            column += n
            if offset + n >= doc_len:
                break
            offset += n - 1
    return Packing(np.asarray(seg_start, dtype=np.int64), np.asarray(seg_len, dtype=np.int64),
                   np.asarray(seg_row, dtype=np.int64), np.asarray(seg_col, dtype=np.int64), row + 1, cut)


@dataclass(frozen=True)
class ShardTask:
    """Write rows [first_row, first_row + rows) as one Parquet file from their segments of the stream."""

    tokens: tuple[tuple[Path, int], ...]
    mask: tuple[tuple[Path, int], ...]
    segments: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    """start, length, row (within this file), column of each segment in these rows."""
    rows: int
    path: Path
    layout: ShardLayout
    pad_id: int
    packed: bool
    metadata: dict[bytes, bytes]


def _write_shard(task: ShardTask) -> tuple[int, int]:
    """Writes the file; returns its real tokens and the tokens in the loss."""
    row_len = task.layout.seq_len + 1
    start, length, row, column = task.segments
    lo, hi = int(start.min()), int((start + length).max())
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    src = np.repeat(start - lo, length) + within
    dst = np.repeat(row * row_len + column, length) + within
    tokens = np.full(task.rows * row_len, task.pad_id, dtype=np.int32)
    tokens[dst] = read_span(task.tokens, lo, hi)[src]
    mask = np.zeros(task.rows * row_len, dtype=np.int8)
    mask[dst] = read_span(task.mask, lo, hi)[src]
    mask[row * row_len + column] = 0  # a segment's first token has nothing before it to be predicted from
    columns = {"tokens": tokens, LOSS_MASK_COLUMN: mask}
    if task.packed:
        positions = np.zeros(task.rows * row_len, dtype=np.int32)
        positions[dst] = within
        columns[POSITION_IDS_COLUMN] = positions
    table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(values), row_len)
                      for name, values in columns.items()}).replace_schema_metadata(task.metadata)
    pq.write_table(table, task.path, row_group_size=task.layout.row_group_rows, compression=task.layout.compression)
    return len(within), int(mask.sum())


@dataclass(frozen=True)
class PrepareSummary:
    """What `shardrun data prepare` wrote, for its summary line."""

    files: list[Path]
    documents: int
    rows: int
    row_len: int
    tokens: int
    """Real tokens in the rows (not padding; a cut document's overlapping tokens twice)."""
    loss_tokens: int
    cut: int
    bad: int
    named: list[tuple[str, str]]
    """(where, why) of the first bad records."""
    held_out: PrepareSummary | None = None
    """What went to the held-out folder (--held-out): its own files, documents, rows and tokens."""
    held_out_dir: Path | None = None
    """The held-out folder, for the summary line."""

    @property
    def efficiency(self) -> float:
        """The share of the rows' tokens that are real, not padding."""
        return self.tokens / (self.rows * self.row_len)

    def line(self, out_dir: str | Path, seconds: float) -> str:
        """The one summary line."""
        size = sum(f.stat().st_size for f in self.files) / 1e6
        return (f"wrote {shard_count(len(self.files))} to {out_dir}: {_count(self.documents, 'document')}, "
                f"{_count(self.rows, 'row')}, {_count(self.tokens, 'token')}, {self.loss_tokens:,} in the loss, "
                f"packing efficiency {self.efficiency:.1%}, {_count(self.cut, 'document')} cut, "
                f"{_count(self.bad, 'bad record')}, {size:,.1f} MB on disk, {seconds:.1f} s{self._held_out_part()}")

    def _held_out_part(self) -> str:
        if self.held_out is None:
            return ""
        held = self.held_out
        return (f"; held out: {_count(held.documents, 'document')}, {_count(held.rows, 'row')}, "
                f"{_count(held.tokens, 'token')} in {self.held_out_dir}")

    def bad_lines(self) -> list[str]:
        """The skipped bad records named, and how many more there were."""
        lines = [f"skipped bad record {where}: {why}" for where, why in self.named]
        if self.bad > len(self.named):
            lines.append(f"... and {self.bad - len(self.named):,} more bad records skipped")
        return lines


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def prepare_documents(sources: list[str | Path], out_dir: Path, seq_len: int, tokenizer: str | Path, *,
                      fmt: RecordFormat | None = None, pack_rows: bool = True, on_bad_record: str = "fail",
                      rows_per_file: int = ROWS_PER_FILE, row_group_rows: int = ROWS_PER_ROW_GROUP,
                      compression: str = DEFAULT_COMPRESSION, workers: int | None = None,
                      held_out: float | None = None, held_out_dir: str | Path | None = None) -> PrepareSummary:
    """Text, prompt/completion or chat records to loss-masked token shards in out_dir (and, with held_out, about
    that share of the documents in held_out_dir instead)."""
    fmt = fmt or RecordFormat()
    layout = ShardLayout(seq_len=seq_len, rows_per_file=rows_per_file, row_group_rows=row_group_rows,
                         compression=compression)
    if on_bad_record not in ON_BAD_RECORD:
        raise UserError(f"--on-bad-record must be one of {', '.join(ON_BAD_RECORD)} (got {on_bad_record!r})")
    held_dir = held_out_folder(out_dir, held_out, held_out_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    tok = DocumentTokenizer.load(tokenizer, needs_chat_template=fmt.kind == "chat")
    parts = input_parts(sources)
    if fmt.kind != "text" and any(p.kind == "text" for p in parts):
        text = next(p.path for p in parts if p.kind == "text")
        raise UserError(f"{text}: a text file is one plain document, but --format {fmt.kind} reads records from "
                        "JSONL (.jsonl, .jsonl.gz) or Parquet (.parquet) files")
    total = sum(p.size for p in parts)
    workers = worker_count(total, workers, batched=fmt.kind != "chat" and getattr(tok.hf, "backend_tokenizer",
                                                                                 None) is not None)
    if workers > 1:  # parts that share the input out (at most MAX_PART_BYTES, one file would be one task)
        parts = input_parts(sources, part_bytes=part_bytes(total, workers))
    groups = _groups(parts, max(workers * TASKS_PER_WORKER, math.ceil(total / MAX_PART_BYTES)))
    with ExitStack() as stack:  # both folders move into place only when both are written
        stagings = [stack.enter_context(staging_dir(d)) for d in (out_dir, held_dir) if d is not None]
        run_all = stack.enter_context(task_runner(workers))
        stream = stagings[0] / ".tokens"
        stream.mkdir()
        tasks = [EncodeTask(tok, fmt, tuple(g), _stream_pieces(stream, i, len(stagings)),
                            stop_at_bad=on_bad_record == "fail", held_out=held_out or 0.0)
                 for i, g in enumerate(groups)]
        results = run_all(_encode_task, tasks, "tokenizing")
        bad = sum(r.bad for r in results)
        named = [n for r in results for n in r.named][:BAD_RECORDS_NAMED]
        if bad and on_bad_record == "fail":
            where, why = named[0]
            raise UserError(f"{where}: bad record: {why}; fix it, or pass --on-bad-record skip to leave bad records "
                            "out (counted and named in the summary)")
        lens = [[r.doc_lens[k] for r in results] for k in range(len(stagings))]
        packings = [pack(np.concatenate(n), layout.seq_len + 1, pack_rows) for n in lens]
        _check_splits(packings, lens, sources, bad, held_out)
        metadata = _metadata(tok, fmt, layout, pack_rows)
        shards = [_shard_tasks(packing, [t.pieces[k] for t in tasks], lens[k], stagings[k], layout, tok.pad_id,
                               pack_rows, metadata) for k, packing in enumerate(packings)]
        counts = run_all(_write_shard, [s for split in shards for s in split], "writing shards")
        shutil.rmtree(stream)
    train_counts, held_counts = counts[: len(shards[0])], counts[len(shards[0]):]
    summary = _summary(out_dir, lens[0], packings[0], train_counts, layout, bad, named)
    if held_dir is None:
        return summary
    held = _summary(held_dir, lens[1], packings[1], held_counts, layout, 0, [])
    return replace(summary, held_out=held, held_out_dir=held_dir)


def held_out_folder(out_dir: Path, share: float | None, held_out_dir: str | Path | None) -> Path | None:
    """Where the held-out documents go (None without a share): held_out_dir, else --out's name with -eval after
    it; checked before any work."""
    if share is None:
        if held_out_dir is not None:
            raise UserError("--held-out-dir goes with --held-out SHARE (the share of the documents to hold out)")
        return None
    if not 0 < share <= MAX_HELD_OUT:
        raise UserError(f"--held-out is the share of the documents to hold out: above 0 and at most {MAX_HELD_OUT} "
                        f"(got {share}; 0.05 holds out about 5%)")
    folder = Path(held_out_dir) if held_out_dir is not None else Path(f"{out_dir}{HELD_OUT_SUFFIX}")
    if folder.exists():
        raise UserError(f"{folder} already exists; remove it or choose another --held-out-dir")
    out, held = Path(out_dir).resolve(), folder.resolve()
    if out == held or out in held.parents or held in out.parents:
        raise UserError(f"--held-out-dir {folder} and --out {out_dir} must be two folders, neither inside the other")
    return folder


def _stream_pieces(stream: Path, i: int, splits: int) -> tuple[StreamPiece, ...]:
    """Task i's piece of each split's stream: the training split's, then the held-out split's."""
    prefixes = ("", "held-out-")[:splits]
    return tuple(StreamPiece(stream / f"{p}tokens-{i:05d}.npy", stream / f"{p}mask-{i:05d}.npy") for p in prefixes)


def _check_splits(packings: list[Packing], lens: list[list[np.ndarray]], sources: list[str | Path], bad: int,
                  share: float | None) -> None:
    """Refuses an empty output: no documents at all, or none in one of the two splits."""
    if not sum(p.rows for p in packings):
        skipped = f" ({bad:,} bad records skipped)" if bad else ""
        raise UserError(f"no documents in {', '.join(map(str, sources))}{skipped}")
    if len(packings) == 1:
        return
    train, held = (sum(len(n) for n in split) for split in lens)
    if not train:
        raise UserError(f"--held-out {share} held out all {_count(held, 'document')}, leaving none to train on; "
                        "give more documents or a smaller share")
    if not held:
        raise UserError(f"--held-out {share} held out none of the {_count(train, 'document')} (each document is "
                        "held out or not by a hash of its tokens); give more documents or a larger share")


def _summary(out_dir: Path, lens: list[np.ndarray], packing: Packing, counts: list[tuple[int, int]],
             layout: ShardLayout, bad: int, named: list[tuple[str, str]]) -> PrepareSummary:
    return PrepareSummary(files=sorted(out_dir.glob("*.parquet")), documents=int(sum(len(n) for n in lens)),
                          rows=packing.rows, row_len=layout.seq_len + 1, tokens=sum(c[0] for c in counts),
                          loss_tokens=sum(c[1] for c in counts), cut=packing.cut, bad=bad, named=named)


def worker_count(total: int, workers: int, *, batched: bool) -> int:
    """Processes for total bytes of input, at most workers: one for a small input, and for text or
    prompt/completion records with a fast tokenizer (batched) up to a large one (MIN_BYTES_PER_BATCHED_WORKER)."""
    return max(1, min(workers, total // (MIN_BYTES_PER_BATCHED_WORKER if batched else MIN_BYTES_PER_WORKER)))


def part_bytes(total: int, workers: int) -> int:
    """The size of the parts the input is read in by that many processes: TASKS_PER_WORKER each."""
    return min(MAX_PART_BYTES, math.ceil(total / (workers * TASKS_PER_WORKER)))


def _groups(parts: list[InputPart], n: int) -> list[list[InputPart]]:
    """About n contiguous runs of parts of about equal bytes."""
    target = sum(p.size for p in parts) / n
    groups, current, filled = [], [], 0
    for part in parts:
        current.append(part)
        filled += part.size
        if filled >= target * (len(groups) + 1):
            groups.append(current)
            current = []
    return groups + [current] if current else groups


def _metadata(tok: DocumentTokenizer, fmt: RecordFormat, layout: ShardLayout, packed: bool) -> dict[bytes, bytes]:
    return {META_TOKENIZER: tok.name.encode(), META_VOCAB_SIZE: str(tok.vocab_size).encode(),
            META_SEQ_LEN: str(layout.seq_len).encode(), META_FORMAT: fmt.kind.encode(),
            META_PACKED: b"true" if packed else b"false"}


def _shard_tasks(packing: Packing, pieces: list[StreamPiece], lens: list[np.ndarray], staging: Path,
                 layout: ShardLayout, pad_id: int, packed: bool, metadata: dict[bytes, bytes]) -> list[ShardTask]:
    """One task per file of rows_per_file rows of one split, whose stream the pieces hold."""
    sizes = [int(n.sum()) for n in lens]
    tokens = tuple(zip([p.tokens for p in pieces], sizes, strict=True))
    mask = tuple(zip([p.mask for p in pieces], sizes, strict=True))
    shards = []
    for i, first in enumerate(range(0, packing.rows, layout.rows_per_file)):
        rows = min(layout.rows_per_file, packing.rows - first)
        lo, hi = np.searchsorted(packing.row, [first, first + rows])
        segments = (packing.start[lo:hi], packing.length[lo:hi], packing.row[lo:hi] - first, packing.column[lo:hi])
        shards.append(ShardTask(tokens, mask, segments, rows, staging / f"part-{i:05d}.parquet", layout, pad_id,
                                packed, metadata))
    return shards
