import hashlib
import inspect
import os
import stat
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrun import cli
from shardrun.datasets import prepare
from shardrun.datasets.prepare import prepare_text, read_corpus, read_vocab_size, token_rows
from shardrun.errors import UserError

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Pack my box with five dozen liquor jugs!\n" * 15,
    "naïve café, ünïcödé ✓ — 東京\n" * 10,
]


def _read_rows(out):
    """Every row of the shards in file order, read with plain pyarrow."""
    parts = []
    for f in sorted(out.glob("*.parquet")):
        col = pq.read_table(f).column("tokens").combine_chunks()
        parts.append(col.flatten().to_numpy().reshape(len(col), col.type.list_size))
    return np.concatenate(parts)


def _stream(rows):
    """The token stream the overlapping rows were cut from."""
    return np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])


def _write_docs(tmp_path, docs=DOCS):
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(docs):
        (src / f"doc{i}.txt").write_text(doc)
    return src


def _train_tokenizer(path, special_tokens):
    """A tiny byte-level BPE trained here on DOCS (no downloads), saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(path))
    return tok


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_token_rows_overlap_by_one():
    rows = token_rows(bytes(range(10)), seq_len=3)
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert rows.dtype == np.int32
    assert token_rows(np.arange(10, dtype=np.int32), seq_len=3).tolist() == rows.tolist()


def test_read_corpus_stops_at_max_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    (tmp_path / "b.txt").write_bytes(b"y" * 100)
    assert len(read_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], max_bytes=150)) == 150


def test_prepare_then_read_back(tmp_path):
    (tmp_path / "t.txt").write_text("hello world, " * 100)
    files = prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8)
    assert files and all(f.suffix == ".parquet" for f in files)
    assert bytes(_read_rows(tmp_path / "out")[0].astype(np.uint8)) == b"hello wor"
    with pytest.raises(UserError, match="already exists"):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8)


def test_byte_mode_is_one_stream_of_the_files_joined_by_a_blank_line(tmp_path):
    src = _write_docs(tmp_path, ["a" * 7000, "b" * 9000, "c" * 9000])
    max_bytes = 20_000  # cuts doc2
    files = prepare_text([src], tmp_path / "out", seq_len=4, max_bytes=max_bytes)

    corpus = b"".join(f.read_bytes() + b"\n\n" for f in sorted(src.iterdir()))[:max_bytes]
    tokens = np.frombuffer(corpus, dtype=np.uint8).astype(np.int32)
    n_rows = (len(tokens) - 1) // 4
    expected = np.stack([tokens[i * 4 : i * 4 + 5] for i in range(n_rows)])
    np.testing.assert_array_equal(_read_rows(tmp_path / "out"), expected)

    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    first = pq.ParquetFile(files[0])
    assert first.metadata.num_rows == 4096
    assert [first.metadata.row_group(i).num_rows for i in range(first.num_row_groups)] == [512] * 8
    assert first.schema_arrow.field("tokens").type == pa.list_(pa.int32(), 5)
    assert first.schema_arrow.metadata == {b"shardrun.tokenizer": b"bytes", b"shardrun.vocab_size": b"256",
                                           b"shardrun.seq_len": b"4"}
    assert read_vocab_size(first.schema_arrow.metadata) == 256


def test_workers_do_not_change_a_single_byte(tmp_path, monkeypatch):
    src = _write_docs(tmp_path, [f"file {i}: " + "some text " * (50 + 37 * i) for i in range(12)])
    monkeypatch.setattr(prepare, "MIN_BYTES_PER_WORKER", {"bytes": 1, "tokenizer": 1})
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare_text([src], out, seq_len=16, max_bytes=20_000, rows_per_file=100, workers=workers)
        outputs[workers] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert len(outputs[1]) > 2 and outputs[1] == outputs[2]


@pytest.mark.parametrize("special_tokens, end_of_text", [(["<|endoftext|>"], "<|endoftext|>"),
                                                          (["[SEP]", "[PAD]"], "[SEP]"), ([], None)])
def test_tokenizer_rows_decode_back_to_the_text(tmp_path, special_tokens, end_of_text):
    tok_path = tmp_path / "tokenizer.json"
    tok = _train_tokenizer(tok_path, special_tokens)
    src = _write_docs(tmp_path)
    files = prepare_text([src], tmp_path / "out", seq_len=5, rows_per_file=64, tokenizer=tok_path)

    sep = [] if end_of_text is None else [tok.token_to_id(end_of_text)]
    expected = [i for doc in DOCS for i in tok.encode(doc, add_special_tokens=False).ids + sep]
    stream = _stream(_read_rows(tmp_path / "out")).tolist()
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 5
    text = "".join(doc + (end_of_text or "") for doc in DOCS)
    assert tok.decode(expected, skip_special_tokens=False) == text
    if end_of_text:
        assert tok.decode(stream[: stream.index(sep[0])]) == DOCS[0]

    schema = pq.read_schema(files[0])
    digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    assert schema.metadata[b"shardrun.tokenizer"] == f"tokenizer.json sha256:{digest}".encode()
    assert read_vocab_size(schema.metadata) == tok.get_vocab_size() > 256
    assert schema.field("tokens").type == pa.list_(pa.int32(), 6)


def test_tokenizer_slices_do_not_change_the_stream(tmp_path, monkeypatch):
    tok_path = tmp_path / "tokenizer.json"
    _train_tokenizer(tok_path, ["<|endoftext|>"])
    src = _write_docs(tmp_path)
    prepare_text([src], tmp_path / "one", seq_len=7, max_bytes=2000, tokenizer=tok_path)
    monkeypatch.setattr(prepare, "MAX_SLICE_BYTES", 100)  # one task per file, in this process
    prepare_text([src], tmp_path / "many", seq_len=7, max_bytes=2000, tokenizer=tok_path)
    np.testing.assert_array_equal(_read_rows(tmp_path / "one"), _read_rows(tmp_path / "many"))


@pytest.mark.parametrize("compression, codec", [("none", "UNCOMPRESSED"), ("snappy", "SNAPPY"), ("zstd", "ZSTD"),
                                                ("lz4", "LZ4"), ("gzip", "GZIP")])
def test_row_group_rows_and_compression_land_in_the_files(tmp_path, compression, codec):
    (tmp_path / "t.txt").write_text("row groups and codecs " * 20)
    files = prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8, rows_per_file=25,
                         row_group_rows=10, compression=compression)
    meta = [pq.read_metadata(f) for f in files]
    assert [m.num_rows for m in meta] == [25, 25, 5]
    assert [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in meta] == [[10, 10, 5]] * 2 + [[5]]
    assert {m.row_group(0).column(0).compression for m in meta} == {codec}


def test_the_staging_folder_never_remains(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("short")
    with pytest.raises(UserError, match="too few for one row"):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=64)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()

    (tmp_path / "t.txt").write_text("long enough for several shards " * 20)
    written = []

    def write_then_fail(task):
        if written:
            raise RuntimeError("disk full")
        written.append(task.path)
        real_write(task)

    real_write = prepare._write_shard
    monkeypatch.setattr(prepare, "_write_shard", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8, rows_per_file=10)
    assert written and not written[0].exists()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    ({"tokenizer": "no-such/tokenizer.json"}, "--tokenizer no-such/tokenizer.json: no such file"),
    ({"rows_per_file": 0}, "--rows-per-file must be at least 1 .got 0."),
    ({"row_group_rows": 0}, "--row-group-rows must be at least 1 .got 0."),
    ({"seq_len": 0}, "--seq-len must be at least 1 .got 0."),
    ({"compression": "brotli"}, "--compression must be one of none, snappy, zstd, lz4, gzip .got 'brotli'."),
    ({"workers": 0}, "--workers must be at least 1 .got 0."),
])
def test_bad_options_are_named(tmp_path, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("text " * 100)
    with pytest.raises(UserError, match=message):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", **{"seq_len": 8, **options})
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_bad_sources_and_tokenizer_files_are_named(tmp_path):
    (tmp_path / "t.txt").write_text("text " * 100)
    with pytest.raises(UserError, match="nothing-here: no such file or directory"):
        prepare_text([tmp_path / "nothing-here"], tmp_path / "out", seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no text files in"):
        prepare_text([tmp_path / "empty"], tmp_path / "out", seq_len=8)
    pytest.importorskip("tokenizers")
    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="broken.json: not a Hugging Face tokenizer.json"):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8, tokenizer=tmp_path / "broken.json")


def test_missing_tokenizers_library_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    prepare._load_tokenizer.cache_clear()
    with pytest.raises(UserError, match=r"pip install 'shardrun\[tokenizers\]'"):
        prepare_text([tmp_path / "tokenizer.json"], tmp_path / "out", seq_len=8, tokenizer=tmp_path / "tokenizer.json")


def test_read_vocab_size():
    assert read_vocab_size({b"shardrun.vocab_size": b"50257"}) == 50257
    assert read_vocab_size({}) is None and read_vocab_size(None) is None
    with pytest.raises(UserError, match="shardrun.vocab_size is b'many', not an integer"):
        read_vocab_size({b"shardrun.vocab_size": b"many"})


def test_cli_passes_the_options_and_reports_what_it_wrote(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("command line text " * 40)  # 720 bytes and a blank line
    out = tmp_path / "out"
    assert cli.main(["data", "prepare-text", str(tmp_path / "t.txt"), "--out", str(out), "--seq-len", "8",
                     "--rows-per-file", "30", "--row-group-rows", "7", "--compression", "snappy",
                     "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 Parquet shards to" in printed and "90 rows, 721 tokens" in printed
    assert "MB on disk" in printed and printed.rstrip().endswith(" s")
    meta = pq.read_metadata(out / "part-00000.parquet")
    assert meta.row_group(0).num_rows == 7 and meta.row_group(0).column(0).compression == "SNAPPY"

    assert cli.main(["data", "prepare-text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "bad"),
                     "--seq-len", "8", "--row-group-rows", "0"]) == cli.EXIT_USER_ERROR
    assert "--row-group-rows must be at least 1" in capsys.readouterr().err


def test_cli_defaults_are_prepare_texts():
    args = cli.build_parser().parse_args(["data", "prepare-text", "--out", "x", "--seq-len", "8"])
    defaults = inspect.signature(prepare_text).parameters
    for name in ("tokenizer", "rows_per_file", "row_group_rows", "compression", "workers"):
        assert getattr(args, name) == defaults[name].default, name
    for codec in prepare.COMPRESSIONS:
        cli.build_parser().parse_args(["data", "prepare-text", "--out", "x", "--seq-len", "8", "--compression", codec])


@pytest.mark.parametrize(("mask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o007, 0o770, 0o660)])
def test_one_shard_is_said_so_and_the_output_follows_the_umask(tmp_path, capsys, mask, folder_mode, file_mode):
    (tmp_path / "t.txt").write_text("one shard " * 20)
    out = tmp_path / "out"
    old = os.umask(mask)
    try:
        assert cli.main(["data", "prepare-text", str(tmp_path / "t.txt"), "--out", str(out), "--seq-len", "8",
                         "--workers", "1"]) == 0
    finally:
        os.umask(old)
    assert f"wrote 1 Parquet shard to {out}: " in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode  # not mkdtemp's 0700
    assert [(p.name, stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()] == [("part-00000.parquet", file_mode)]
    assert prepare.shard_count(0) == "0 Parquet shards" and prepare.shard_count(2) == "2 Parquet shards"
