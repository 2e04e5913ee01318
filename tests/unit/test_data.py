import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrun.config import DataSpec
from shardrun.datasets import open as open_stream
from shardrun.datasets.prepare import prepare_text, read_corpus, token_rows
from shardrun.datasets.source import list_parquet, read_token_rows
from shardrun.datasets.tokens import BatchShape, TokenStream
from shardrun.errors import UserError
from shardrun.trainer.topology import Topology


def _rows(n=50, length=5):
    return np.arange(n * length, dtype=np.int32).reshape(n, length)


def _stream(rows, rank=0, world=1, micro=2, accum=1, seed=0, position=None):
    shape = BatchShape(micro_batch_size=micro, grad_accum_steps=accum, world_size=world)
    return TokenStream(rows, rank=rank, shape=shape, seed=seed, position=position)


def _step_rows(streams, accum):
    """The set of row ids (first token // row length) the streams take in one global step."""
    got = []
    for _ in range(accum):
        for s in streams:
            got.extend((s.next_batch()["inputs"][:, 0] // 5).tolist())
    return sorted(got)


def test_token_rows_overlap_by_one():
    rows = token_rows(bytes(range(10)), seq_len=3)
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_read_corpus_stops_at_max_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    (tmp_path / "b.txt").write_bytes(b"y" * 100)
    assert len(read_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], max_bytes=150)) == 150


def test_prepare_then_read_back(tmp_path):
    (tmp_path / "t.txt").write_text("hello world, " * 100)
    files = prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8)
    assert files and all(f.suffix == ".parquet" for f in files)
    rows = read_token_rows([str(tmp_path / "out")], "tokens", 9)
    assert bytes(rows[0].astype(np.uint8)) == b"hello wor"
    with pytest.raises(UserError, match="already exists"):
        prepare_text([tmp_path / "t.txt"], tmp_path / "out", seq_len=8)


def test_targets_are_inputs_shifted():
    batch = _stream(_rows()).next_batch()
    assert batch["inputs"].shape == (2, 4)
    assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()


def test_same_seed_same_order_other_seed_other_order():
    a = [_stream(_rows(), seed=1).next_batch()["inputs"] for _ in range(1)]
    b = [_stream(_rows(), seed=1).next_batch()["inputs"] for _ in range(1)]
    c = [_stream(_rows(), seed=2).next_batch()["inputs"] for _ in range(1)]
    assert (a[0] == b[0]).all() and not (a[0] == c[0]).all()


def test_an_epoch_sees_every_row_once_and_carries_on():
    s = _stream(_rows(n=10), micro=5)
    assert sorted(_step_rows([s], 1) + _step_rows([s], 1)) == list(range(10))
    assert sorted(_step_rows([s], 1) + _step_rows([s], 1)) == list(range(10))


def test_ranks_split_each_step_without_overlap():
    streams = [_stream(_rows(), rank=r, world=2, micro=3, accum=2) for r in range(2)]
    got = _step_rows(streams, accum=2)
    assert len(got) == len(set(got)) == 12


def test_every_world_size_sees_the_same_samples_per_step():
    rows = _rows(n=48)
    one = [_stream(rows, world=1, micro=4, accum=3)]
    two = [_stream(rows, rank=r, world=2, micro=2, accum=3) for r in range(2)]
    four = [_stream(rows, rank=r, world=4, micro=1, accum=3) for r in range(4)]
    for _ in range(5):
        a = _step_rows(one, 3)
        assert a == _step_rows(two, 3) == _step_rows(four, 3)


def test_resume_from_position_continues_exactly():
    rows = _rows()
    full = _stream(rows, accum=2)
    part = _stream(rows, accum=2)
    for _ in range(3 * 2):
        full.next_batch()
        part.next_batch()
    position = part.position()
    assert position == {"seed": 0, "rows": 50, "sample": 12}
    resumed = _stream(rows, accum=2, position=position)
    for _ in range(10):
        assert (full.next_batch()["inputs"] == resumed.next_batch()["inputs"]).all()


def test_position_only_between_steps_and_checked_on_resume():
    s = _stream(_rows(), accum=2)
    s.next_batch()
    with pytest.raises(RuntimeError, match="between steps"):
        s.position()
    with pytest.raises(UserError, match="keep the seed"):
        _stream(_rows(), seed=5, position={"seed": 0, "rows": 50, "sample": 4})
    with pytest.raises(UserError, match="now holds 40 rows"):
        _stream(_rows(n=40), position={"seed": 0, "rows": 50, "sample": 4})


def _write(path, table):
    pq.write_table(table, path)
    return path


def test_bad_files_are_named(tmp_path):
    good = pa.table({"tokens": pa.array([[1, 2, 3, 4]] * 3, type=pa.list_(pa.int32()))})
    _write(tmp_path / "a.parquet", good)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"b\.parquet: cannot read column 'tokens' as Parquet"):
        read_token_rows([str(tmp_path)], "tokens", 4)


def test_schema_problems_are_named(tmp_path):
    strings = _write(tmp_path / "s.parquet", pa.table({"tokens": ["a", "b"]}))
    with pytest.raises(UserError, match=r"s\.parquet: column 'tokens' is string, expected a list"):
        read_token_rows([str(strings)], "tokens", 2)
    with pytest.raises(UserError, match=r"s\.parquet: cannot read column 'text'"):
        read_token_rows([str(strings)], "text", 2)
    ragged = _write(tmp_path / "r.parquet", pa.table({"tokens": [[1, 2, 3], [1, 2]]}))
    with pytest.raises(UserError, match=r"r\.parquet: rows of column 'tokens' have 2 to 3 tokens"):
        read_token_rows([str(ragged)], "tokens", 2)
    short = _write(tmp_path / "short.parquet", pa.table({"tokens": [[1, 2], [3, 4]]}))
    with pytest.raises(UserError, match=r"short\.parquet: rows hold 2 tokens, fewer than"):
        read_token_rows([str(short)], "tokens", 3)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_parquet([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .parquet files"):
        list_parquet([str(tmp_path / "empty")])


def test_open_reads_the_corpus(corpus):
    spec = DataSpec(paths=[str(corpus)], seq_len=16)
    topo = Topology(rank=1, world_size=2, local_rank=1, device="cpu")
    stream = open_stream(spec, topo, None, micro_batch_size=3, grad_accum_steps=1)
    batch = stream.next_batch()
    assert batch["inputs"].shape == (3, 16)
    assert batch["inputs"].max() < 256
