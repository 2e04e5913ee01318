"""The data index: every Parquet file, its row groups and row counts, read once (in parallel) per run.

The driver builds the index before any cluster resource is taken (so a missing, corrupt or
mismatching file is named up front) and hands it to the workers as a plain dict; a restarted worker
group gets the same dict, so file footers are read once per run, not once per rank and restart.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardrun.config import DataSpec
from shardrun.errors import UserError
from shardrun.fs import display_path, filesystem

METADATA_THREADS = 16
META_SEQ_LEN = b"shardrun.seq_len"
"""The Parquet schema metadata key where `shardrun data prepare-text` records the rows' seq_len."""


def list_parquet(paths: list[str]) -> tuple[list[pafs.FileSystem], list[tuple[int, str]]]:
    """Each path's filesystem, and (index of the source in paths, filesystem path) of every Parquet
    file, in a stable order."""
    files, filesystems = [], []
    for i, path in enumerate(paths):
        fs, root = filesystem(path)
        filesystems.append(fs)
        try:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                raise UserError(f"data.paths: {path} does not exist")
            if info.type == pafs.FileType.File:
                files.append((i, root))
                continue
            found = sorted(
                f.path
                for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                if f.type == pafs.FileType.File and f.path.endswith(".parquet")
            )
        except OSError as e:
            raise UserError(f"data.paths: cannot list {path}: {e}") from None
        if not found:
            raise UserError(f"data.paths: {path} holds no .parquet files")
        files.extend((i, f) for f in found)
    return filesystems, files


@dataclass(frozen=True)
class FileEntry:
    source: int
    """Index into DataSpec.paths (its filesystem opens this file)."""
    path: str
    """Path inside that filesystem."""
    name: str
    """The file as the user knows it (for messages)."""
    size: int
    """Bytes on storage."""
    row_groups: list[int]
    """Rows of each row group."""


@dataclass
class DataIndex:
    paths: list[str]
    files: list[FileEntry]
    schema: dict[str, str]
    """Column name -> Arrow type, for the columns the run reads."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, why) of files left out under on_bad_file: skip."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The first file's `shardrun.*` Parquet metadata (tokenizer, vocab_size, seq_len), if any."""

    def __post_init__(self):
        self.files = [f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files]
        self.skipped = [tuple(s) for s in self.skipped]
        # row group g of the run: file rg_file[g], its row group rg_index[g], rg_rows[g] rows
        pairs = [(fi, j, n) for fi, f in enumerate(self.files) for j, n in enumerate(f.row_groups) if n]
        arr = np.array(pairs, dtype=np.int64).reshape(-1, 3)
        self.rg_file, self.rg_index, self.rg_rows = arr[:, 0], arr[:, 1], arr[:, 2]

    @property
    def rows(self) -> int:
        return int(self.rg_rows.sum())

    @property
    def num_row_groups(self) -> int:
        return len(self.rg_rows)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def fingerprint(self) -> str:
        """Changes when the files' row groups change (the sample order depends on them)."""
        h = hashlib.sha256(self.rg_rows.astype("<i8").tobytes())
        h.update(str(len(self.files)).encode())
        return h.hexdigest()[:16]

    def describe(self, g: int) -> str:
        """Row group g as the user can find it: file and row group number."""
        return f"{self.files[self.rg_file[g]].name} row group {self.rg_index[g]}"

    def to_dict(self) -> dict:
        return {"paths": self.paths, "files": [asdict(f) for f in self.files],
                "schema": self.schema, "skipped": [list(s) for s in self.skipped], "metadata": self.metadata}

    @property
    def vocab_size(self) -> int | None:
        """Token ids are below this (from `shardrun data prepare-text`'s metadata), if known."""
        value = self.metadata.get("shardrun.vocab_size")
        return int(value) if value and value.isdigit() else None

    @classmethod
    def from_dict(cls, d: dict) -> DataIndex:
        return cls(**d)


def build(spec: DataSpec, emit=None) -> DataIndex:
    """Read every file's footer (in parallel), check the schema, and index the row groups.

    Token data with data.seq_len unset takes the files' own (`files_seq_len`) and sets it on `spec`, so that the
    spec the caller hands on (the driver's to its workers) carries it.
    """
    filesystems, listed = list_parquet(spec.paths)
    wanted = _wanted_columns(spec)

    def read(item):
        source, path = item
        name = display_path(spec.paths[source], path)
        try:
            fs = filesystems[source]
            size = fs.get_file_info(path).size
            meta = pq.read_metadata(path, filesystem=fs)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            return name, f"not a readable Parquet file ({first_line(e)})"
        row_groups = [meta.row_group(j).num_rows for j in range(meta.num_row_groups)]
        return FileEntry(source, path, name, size, row_groups), schema

    with ThreadPoolExecutor(min(METADATA_THREADS, max(1, len(listed)))) as pool:
        results = list(pool.map(read, listed))

    if spec.format == "tokens" and spec.seq_len is None:
        found = files_seq_len(spec, [r for r in results if not isinstance(r[0], str)])
        if found is not None:
            spec.seq_len = found
    if spec.format == "tokens":  # a loss mask and positions are read where the first file has them
        first = next((schema for entry, schema in results if not isinstance(entry, str)), None)
        wanted = wanted + [c for c in TOKEN_EXTRAS if first is not None and c in first.names]
    files, problems, types, metadata = [], [], {}, {}
    short: dict[str, int] = {}
    """Files left out because their fixed-size rows are shorter than seq_len + 1: tokens per row."""
    for entry, schema_or_error in results:
        if isinstance(entry, str):
            problem = (entry, schema_or_error)
        else:
            problem = _check_schema(spec, entry.name, schema_or_error, wanted, types)
            if problem is not None and _row_tokens(spec, schema_or_error):
                short[entry.name] = _row_tokens(spec, schema_or_error)
        if problem is None:
            files.append(entry)
            if len(files) == 1:
                metadata = {k.decode(): v.decode(errors="replace")
                            for k, v in (schema_or_error.metadata or {}).items() if k.startswith(b"shardrun.")}
        else:
            problems.append(problem)
    if problems and spec.on_bad_file != "skip":
        name, why = problems[0]
        if name in short and not files:  # leaving files out would leave none: the fix is the seq_len
            raise UserError(f"{name}: {why}; {_shorter_seq_len(spec, short)}")
        raise UserError(f"{name}: {why} (data.on_bad_file: skip leaves it out)")
    skipped = problems
    if skipped and emit:
        for name, why in skipped:
            emit(f"skipping {name}: {why}")
        emit(f"data.on_bad_file: skip left out {len(skipped)} of {len(listed)} files")
    index = DataIndex(list(spec.paths), files, {c: str(t) for c, t in types.items()}, skipped, metadata)
    if index.rows == 0:
        if skipped and not files:
            fix = f"; {_shorter_seq_len(spec, short)}" if short else ""
            raise UserError(f"data.paths: data.on_bad_file: skip left out every file of {', '.join(spec.paths)}, "
                            f"so none is left to read (the first: {skipped[0][0]}: {skipped[0][1]}){fix}")
        raise UserError(f"data.paths: the Parquet files in {', '.join(spec.paths)} hold no rows")
    return index


def column_ranges(index: DataIndex, columns: list[str]) -> dict[str, tuple[float, float] | tuple[None, None]]:
    """The smallest and largest value of each numeric column (of a list column: of its elements) over every file,
    from the Parquet footers' statistics, each footer read once; (None, None) for a column where a row group has
    none."""
    ranges: dict[str, tuple] = {c: (None, None) for c in columns}
    unknown: set[str] = set()
    for f in index.files:
        fs, _ = filesystem(index.paths[f.source])
        meta = pq.read_metadata(f.path, filesystem=fs)
        for i in range(meta.num_columns):
            column = meta.schema.column(i).path.split(".")[0]
            if column not in ranges or column in unknown:
                continue
            for j in range(meta.num_row_groups):
                stats = meta.row_group(j).column(i).statistics
                if stats is None or not stats.has_min_max:
                    unknown.add(column)
                    break
                low, high = ranges[column]
                ranges[column] = (stats.min if low is None else min(low, stats.min),
                                  stats.max if high is None else max(high, stats.max))
    return {c: (None, None) if c in unknown else r for c, r in ranges.items()}


def files_seq_len(spec: DataSpec, readable: list[tuple[FileEntry, pa.Schema]]) -> int | None:
    """The seq_len every token file records (`shardrun.seq_len` metadata, else a fixed-size list column's length
    less one), for data.seq_len left unset; a UserError naming two files that differ, or one that records none.
    None when no file has the token column (the schema check names them)."""
    found = [(entry.name, _recorded_seq_len(spec, schema)) for entry, schema in readable
             if spec.column in schema.names and not _type_problem(spec, spec.column, schema.field(spec.column).type)]
    if not found:
        return None
    first, n = found[0]
    other = next(((name, m) for name, m in found[1:] if m != n), None)
    if other:
        def say(m):
            return f"seq_len {m}" if m else "none recorded"

        raise UserError(f"data.seq_len is unset and the files disagree on it: {first} has {say(n)}, {other[0]} has "
                        f"{say(other[1])}; set data.seq_len, or use files prepared with the same --seq-len")
    if n is None:
        raise UserError(f"data.seq_len is unset and {first} records none (no {META_SEQ_LEN.decode()} in its Parquet "
                        f"metadata, and column {spec.column!r} is not a fixed-size list); set data.seq_len")
    return n


def _recorded_seq_len(spec: DataSpec, schema: pa.Schema) -> int | None:
    raw = (schema.metadata or {}).get(META_SEQ_LEN, b"").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    t = schema.field(spec.column).type
    return t.list_size - 1 if pa.types.is_fixed_size_list(t) and t.list_size >= 2 else None


def _row_tokens(spec: DataSpec, schema: pa.Schema) -> int | None:
    """Tokens per row of a file whose fixed-size token rows are shorter than data.seq_len + 1, else None."""
    if spec.format != "tokens" or spec.seq_len is None or spec.column not in schema.names:
        return None
    t = schema.field(spec.column).type
    return t.list_size if pa.types.is_fixed_size_list(t) and t.list_size < spec.seq_len + 1 else None


def _shorter_seq_len(spec: DataSpec, short: dict[str, int]) -> str:
    """The fixes for rows shorter than seq_len + 1 in every file: a seq_len they hold, or data prepared anew."""
    n = min(short.values())
    again = (f"move {spec.paths[0]} aside so that data.prepare writes it again with data.seq_len {spec.seq_len}"
             if spec.prepare else f"prepare the data again with --seq-len {spec.seq_len}")
    if n < 2:
        return again
    return f"set data.seq_len to {n - 1} or less (the rows' length less one), or {again}"


TOKEN_EXTRAS = ("loss_mask", "position_ids")
"""Token data's optional per-token columns (`shardrun data prepare`'s), read with the tokens when the first file
has them (then every file must): shardrun.datasets.reader decodes them."""


def _wanted_columns(spec: DataSpec) -> list[str] | None:
    if spec.format == "tokens":
        return [spec.column]
    if spec.columns is None:
        return None  # every column
    return list(spec.columns) + ([spec.label] if spec.label else [])


def _check_schema(spec: DataSpec, name: str, schema: pa.Schema, wanted: list[str] | None,
                  types: dict[str, pa.DataType]) -> tuple[str, str] | None:
    """(file, problem) if this file's schema does not fit the spec or the files before it."""
    columns = wanted if wanted is not None else list(schema.names)
    if spec.label and spec.label not in columns:
        columns.append(spec.label)
    for col in columns:
        if col not in schema.names:
            return name, f"has no column {col!r} (columns: {', '.join(schema.names)})"
        t = schema.field(col).type
        problem = _type_problem(spec, col, t)
        if problem:
            return name, problem
        if col in types and types[col] != t:
            return name, f"column {col!r} is {t}, but the files before it have {types[col]}"
    for col in columns:
        types.setdefault(col, schema.field(col).type)
    return None


def _type_problem(spec: DataSpec, col: str, t: pa.DataType) -> str | None:
    if spec.format == "tokens":
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                or not pa.types.is_integer(t.value_type):
            return f"column {col!r} is {t}, expected a list of integer token ids"
        if spec.seq_len is not None and pa.types.is_fixed_size_list(t) and t.list_size < spec.seq_len + 1:
            return (f"rows of column {col!r} hold {t.list_size} tokens, fewer than "
                    f"data.seq_len + 1 = {spec.seq_len + 1}")
        return None
    base = t.value_type if pa.types.is_fixed_size_list(t) else t
    if not (pa.types.is_integer(base) or pa.types.is_floating(base) or pa.types.is_boolean(base)):
        return f"column {col!r} is {t}; table columns must be numbers, booleans or fixed-size lists of them"
    return None


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
