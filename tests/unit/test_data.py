"""The Parquet stream: index, batches, exact and elastic resume, bad data (real Parquet files)."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datagen import ROW_LEN, corrupt_row_group, write_layout
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardrun.config import DataSpec
from shardrun.datasets import Stream, build_index
from shardrun.datasets import open as open_stream
from shardrun.datasets.plan import Plan
from shardrun.errors import UserError
from shardrun.trainer.topology import Topology


def spec_for(root, **kw) -> DataSpec:
    return DataSpec(paths=[str(root)], seq_len=ROW_LEN - 1, **kw)


def make_world(spec, index, world, global_batch, position=None, accum=1, chunk_rows=None):
    micro = global_batch // world // accum
    return [Stream(spec, index, rank=r, world_size=world, micro_batch_size=micro, grad_accum_steps=accum,
                   position=position, chunk_rows=chunk_rows) for r in range(world)]


def take_steps(streams, n):
    """The ids of each global step, sorted (the set a step trains on), for n steps."""
    steps = []
    for _ in range(n):
        ids = []
        for s in streams:
            for _ in range(s.grad_accum_steps):
                ids.extend(s.next_batch()["inputs"][:, 0].tolist())
        steps.append(sorted(ids))
    return steps


def close(streams):
    for s in streams:
        s.close()


# -- properties over random layouts, world sizes and stop points --------------------------------------

layouts = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, worlds=st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4])),
       k=st.integers(1, 2), window=st.integers(1, 12), seed=st.integers(0, 2),
       chunks=st.tuples(st.sampled_from([1, 5, None]), st.sampled_from([1, 5, None])), data=st.data())
def test_stop_and_resume_on_any_world_size_equals_an_uninterrupted_run(layout, worlds, k, window, seed, chunks, data):
    """chunks: rows each rank gathers at once (None: the default, more than these files hold)."""
    partitions = 4
    global_batch = partitions * k
    rg_rows = [n for groups in layout for n in groups]
    plan = Plan(np.array(rg_rows), partitions=partitions, seed=seed, window=window)
    per_epoch = [plan.steps_in_epoch(e, k) for e in range(3)]
    assume(min(per_epoch) >= 1)
    total = min(per_epoch[0] + per_epoch[1] + 1, 12)
    stop = data.draw(st.integers(0, total))
    with tempfile.TemporaryDirectory() as tmp:
        n_rows = write_layout(Path(tmp), layout)
        spec = spec_for(tmp, partitions=partitions, shuffle_window=window, seed=seed, prefetch_steps=2)
        index = build_index(spec)
        whole = make_world(spec, index, worlds[0], global_batch)
        expected = take_steps(whole, total)
        close(whole)

        first = make_world(spec, index, worlds[0], global_batch, chunk_rows=chunks[0])
        got = take_steps(first, stop)
        positions = [s.position() for s in first]
        close(first)
        assert all(p == positions[0] for p in positions)
        second = make_world(spec, index, worlds[1], global_batch, positions[0], chunk_rows=chunks[1])
        got += take_steps(second, total - stop)
        decoded = [s.decoded for s in second]
        close(second)

    assert got == expected
    # within an epoch every sample appears once
    epoch0 = [i for step in expected[: per_epoch[0]] for i in step]
    assert len(epoch0) == len(set(epoch0)) and set(epoch0) <= set(range(n_rows))
    # no row group is decoded by two ranks in one epoch, nor twice by one rank
    owners = {}
    for rank, log in enumerate(decoded):
        assert len(log) == len(set(log))
        for epoch, g in log:
            assert owners.setdefault((epoch, g), rank) == rank


def test_micro_batches_and_accumulation_split_the_same_step(tmp_path):
    write_layout(tmp_path, [[8] * 6])
    spec = spec_for(tmp_path, partitions=4)
    index = build_index(spec)
    plain = make_world(spec, index, 2, 8)
    accum = make_world(spec, index, 2, 8, accum=2)
    assert take_steps(plain, 5) == take_steps(accum, 5)
    close(plain + accum)


def test_batches_are_inputs_and_shifted_targets(corpus):
    spec = DataSpec(paths=[str(corpus)], seq_len=16)
    topo = Topology(rank=1, world_size=2, local_rank=1, device="cpu")
    with open_stream(spec, topo, None, micro_batch_size=3, grad_accum_steps=1) as stream:
        batch = stream.next_batch()
        assert batch["inputs"].shape == batch["targets"].shape == (3, 16)
        assert batch["inputs"].dtype == batch["targets"].dtype == torch.int64
        assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()
        assert batch["inputs"].max() < 256
        stats = stream.stats()
        assert stats["buffered_bytes"] > 0 and stats["skipped_row_groups"] == 0


def test_variable_length_rows_are_cut_or_padded_and_padding_is_not_a_target(tmp_path):
    col = pa.array([[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], type=pa.list_(pa.int64()))
    pq.write_table(pa.table({"tokens": col}), tmp_path / "v.parquet")
    spec = DataSpec(paths=[str(tmp_path)], seq_len=4, partitions=1, shuffle_window=1)
    with Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=3, grad_accum_steps=1) as s:
        b = s.next_batch()
    rows = {int(r[0]): (r.tolist(), t.tolist()) for r, t in zip(b["inputs"], b["targets"], strict=True)}
    assert rows[1] == ([1, 2, 3, 4], [2, 3, 4, 5])
    assert rows[8] == ([8, 9, 0, 0], [9, -100, -100, -100])
    assert rows[10] == ([10, 11, 12, 0], [11, 12, -100, -100])


def test_table_columns_become_a_dict_of_tensors_with_a_label(tmp_path):
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(24, dtype=np.float64)), 3)
    table = pa.table({"x": x, "w": pa.array(np.arange(8), pa.int16()), "y": pa.array(np.arange(8) % 2)})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    spec = DataSpec(paths=[str(tmp_path)], format="table", label="y", partitions=1)
    with Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=2) as s:
        batches = [s.next_batch() for _ in range(2)]
    assert set(batches[0]) == {"x", "w", "label"}
    assert batches[0]["x"].shape == (4, 3) and batches[0]["x"].dtype == torch.float32
    seen = sorted(int(w) for b in batches for w in b["w"])
    assert seen == list(range(8))
    for b in batches:
        assert ((b["x"][:, 0] / 3).long() == b["w"]).all() and ((b["w"] % 2) == b["label"]).all()


# -- position ------------------------------------------------------------------------------------------


def test_position_only_between_steps_and_checked_on_resume(tmp_path):
    write_layout(tmp_path, [[10] * 4])
    spec = spec_for(tmp_path)
    index = build_index(spec)
    (s,) = make_world(spec, index, 1, 4, accum=2)
    s.next_batch()
    with pytest.raises(RuntimeError, match="between steps"):
        s.position()
    s.next_batch()
    position = s.position()
    s.close()
    assert position["epoch"] == 0 and position["offset"] == 4 and position["partitions"] == 1
    with pytest.raises(UserError, match="keep the seed"):
        make_world(spec_for(tmp_path, seed=5), index, 1, 4, position)
    with pytest.raises(UserError, match="partition count is fixed"):
        make_world(spec_for(tmp_path, partitions=2), index, 2, 4, position)
    write_layout(tmp_path / "more", [[3]])
    bigger = spec_for(tmp_path)
    with pytest.raises(UserError, match=r"the data changed: it now holds 43 rows in 5 row groups, the checkpoint's 40"):
        make_world(bigger, build_index(bigger), 1, 4, position)


def test_partition_count_is_checked_against_world_and_batch(tmp_path):
    write_layout(tmp_path, [[10] * 4])
    index = build_index(spec_for(tmp_path))
    with pytest.raises(UserError, match=r"data.partitions \(3\) must be a multiple of the world size \(2\)"):
        make_world(spec_for(tmp_path, partitions=3), index, 2, 6)
    with pytest.raises(UserError, match=r"global batch \(6 = .*must be a multiple of data.partitions \(4\)"):
        make_world(spec_for(tmp_path, partitions=4), index, 2, 6)
    with pytest.raises(UserError, match="too few for one step"):
        make_world(spec_for(tmp_path, partitions=4), index, 2, 48)


# -- bad data ------------------------------------------------------------------------------------------


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UserError, match="nope does not exist"):
        build_index(spec_for(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .parquet files"):
        build_index(spec_for(tmp_path / "empty"))


def test_corrupt_file_is_named_or_skipped_and_counted(tmp_path):
    write_layout(tmp_path, [[10] * 4, [10] * 4])
    (tmp_path / "part-999.parquet").write_bytes(b"PAR1 this is not parquet")
    good = (tmp_path / "part-000.parquet").read_bytes()
    (tmp_path / "part-500.parquet").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match=r"part-500\.parquet: not a readable Parquet file"):
        build_index(spec_for(tmp_path))
    lines = []
    index = build_index(spec_for(tmp_path, on_bad_file="skip"), emit=lines.append)
    assert index.rows == 80 and [Path(n).name for n, _ in index.skipped] == ["part-500.parquet",
                                                                            "part-999.parquet"]
    assert lines[-1] == "data.on_bad_file: skip left out 2 of 4 files"


def test_wrong_schema_is_named(tmp_path):
    write_layout(tmp_path, [[10]])
    pq.write_table(pa.table({"tokens": ["a", "b"]}), tmp_path / "strings.parquet")
    with pytest.raises(UserError, match=r"strings\.parquet: column 'tokens' is string, expected a list"):
        build_index(spec_for(tmp_path))
    with pytest.raises(UserError, match=r"part-000\.parquet: has no column 'text'"):
        build_index(DataSpec(paths=[str(tmp_path / "part-000.parquet")], column="text", seq_len=4))
    (tmp_path / "strings.parquet").unlink()
    pq.write_table(pa.table({"tokens": pa.array([[1] * 5], pa.list_(pa.int64()))}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x\.parquet: column 'tokens' is list<element: int64>, but the files "
                                        r"before it have fixed_size_list"):
        build_index(spec_for(tmp_path))
    index = build_index(spec_for(tmp_path, on_bad_file="skip"))
    assert index.rows == 10 and len(index.skipped) == 1
    with pytest.raises(UserError, match=r"rows of column 'tokens' hold 5 tokens, fewer than data.seq_len \+ 1 = 9"):
        build_index(DataSpec(paths=[str(tmp_path / "part-000.parquet")], seq_len=8))


def test_a_corrupt_row_group_is_named_when_met_or_skipped_as_padding(tmp_path):
    write_layout(tmp_path, [[10, 10, 10, 10]])
    corrupt_row_group(tmp_path / "part-000.parquet", 1)
    spec = spec_for(tmp_path, partitions=1, shuffle_window=40)
    (s,) = make_world(spec, build_index(spec), 1, 40)
    with pytest.raises(UserError, match=r"part-000\.parquet row group 1: cannot be read"):
        s.next_batch()
    s.close()
    lines = []
    skip = spec_for(tmp_path, partitions=1, shuffle_window=40, on_bad_file="skip")
    s = Stream(skip, build_index(skip), rank=0, world_size=1, micro_batch_size=40, grad_accum_steps=1,
               log=lines.append)
    batch = s.next_batch()
    s.close()
    padded = (batch["targets"] == -100).all(dim=1)
    assert int(padded.sum()) == 10 and s.stats()["skipped_row_groups"] == 1
    assert "part-000.parquet row group 1: cannot be read" in lines[0]
    assert sorted(batch["inputs"][~padded][:, 0].tolist()) == [i for i in range(40) if not 10 <= i < 20]


def test_a_worker_error_reaches_the_loop_and_stops_the_threads(tmp_path):
    write_layout(tmp_path, [[10, 10]])
    spec = spec_for(tmp_path, partitions=1)
    index = build_index(spec)
    (tmp_path / "part-000.parquet").unlink()
    (s,) = make_world(spec, index, 1, 4)
    with pytest.raises(UserError, match=r"part-000\.parquet row group \d: cannot be read"):
        s.next_batch()
    assert not s._producer.is_alive()


def test_steps_per_epoch_and_epoch_remainder(tmp_path):
    write_layout(tmp_path, [[7] * 6])
    spec = spec_for(tmp_path, partitions=2)
    (s,) = make_world(spec, build_index(spec), 1, 4)
    # 42 rows in groups of 7 -> partitions of 21 rows; 2 samples from each per step -> 10 steps
    assert s.steps_per_epoch() == 10 == math.floor(21 / 2)
    s.close()


# -- the command line ----------------------------------------------------------------------------------


def test_data_inspect_prints_files_schema_and_steps(corpus, capsys):
    from shardrun import cli

    assert cli.main(["data", "inspect", str(corpus), "--global-batch", "64", "--partitions", "2"]) == 0
    out = capsys.readouterr().out
    assert "part-00000.parquet" in out and "schema: tokens: fixed_size_list<element: int32>[33]" in out
    assert "written by shardrun: tokenizer bytes, vocab_size 256, seq_len 32" in out
    index = build_index(DataSpec(paths=[str(corpus)], seq_len=32))
    steps = Plan(index.rg_rows, partitions=2, seed=0, window=8192).steps_in_epoch(0, 32)
    assert f"steps per epoch: {steps:,} at a global batch of 64 over 2 partitions" in out
    assert cli.main(["data", "inspect", str(corpus), "--global-batch", "63", "--partitions", "2"]) == 2
    assert "must be a multiple of data.partitions (2)" in capsys.readouterr().err


def test_run_refuses_a_model_smaller_than_the_data_vocabulary(tmp_path, corpus, capsys):
    from shardrun import cli

    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: v\nmodel: {{vocab_size: 100, block_size: 32}}\ndata: {{paths: [{corpus}], seq_len: 32}}\n"
                    f"run: {{max_steps: 1}}\ncheckpoint: {{storage: {tmp_path}}}\n")
    assert cli.main(["train", str(spec)]) == 2
    assert "token ids go up to 255" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_storage_secrets_are_masked_in_messages():
    from shardrun.errors import redact

    assert redact("abfs://acct@127.0.0.1:1/c/p?enable_tls=false&sv=2024&sig=abc%2Fdef&se=x: 403") == \
        "abfs://acct@127.0.0.1:1/c/p?enable_tls=false&sv=2024&sig=***&se=x: 403"
    assert redact("s3://AKID:s3cr%2Bt@bucket/x?scheme=http") == "s3://AKID:***@bucket/x?scheme=http"
    assert redact("abfs://c@acct.dfs.core.windows.net/p?client_id=1&client_secret=zz") == \
        "abfs://c@acct.dfs.core.windows.net/p?client_id=1&client_secret=***"
    assert redact("/local/path: fine") == "/local/path: fine"
    # keys with / and +, connection strings, session credentials, bearer tokens
    assert redact("abfs://runs:AbC/dE+f==@acct.dfs.core.windows.net/x") == "abfs://runs:***@acct.dfs.core.windows.net/x"
    assert redact("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9v/YmFy+==;EndpointSuffix=x") == \
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;EndpointSuffix=x"
    assert redact("s3://b/p?access_key=AK&secret_key=SK&session_token=ST") == \
        "s3://b/p?access_key=***&secret_key=***&session_token=***"
    assert redact("Authorization: Bearer eyJ0eXAi.eyJzdWIi.c2ln") == "Authorization: Bearer ***"
    assert redact("http://127.0.0.1:8265 answered 503") == "http://127.0.0.1:8265 answered 503"


def test_data_too_small_for_one_step_is_an_error_before_any_training(tmp_path, corpus, capsys):
    from shardrun import cli

    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: small\ndata: {{paths: [{corpus}], seq_len: 32}}\nmodel: {{block_size: 32}}\n"
                    f"deepspeed: {{micro_batch_size: 100000}}\nrun: {{max_steps: 1}}\n"
                    f"checkpoint: {{storage: {tmp_path}}}\n")
    assert cli.main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "rows make no whole step of a global batch of 200000 samples over 2 partitions" in err, err
    assert not (tmp_path / "small").exists()


def _token_file(path: Path, rows: list, row_group_size: int) -> None:
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int64()))}), path, row_group_size=row_group_size)


@pytest.mark.parametrize(("bad_row", "vocab", "why"), [
    ([1, None, 3, 4, 5, 6, 7, 8, 9], None, "1 token ids inside the rows are null"),
    ([1, 2, 3, 4, 300, 6, 7, 8, 9], 256,
     r"token ids range 1\.\.300, outside the model's vocabulary \(0\.\.255, model\.vocab_size\)"),
])
def test_bad_token_ids_name_their_row_group_or_are_skipped(tmp_path, bad_row, vocab, why):
    good = [list(range(i, i + 9)) for i in range(10)]
    _token_file(tmp_path / "part-000.parquet", good[:5] + [bad_row] + good[6:], row_group_size=5)
    spec = spec_for(tmp_path, partitions=1, shuffle_window=10)
    s = Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=10, grad_accum_steps=1,
               vocab_size=vocab)
    with pytest.raises(UserError, match=rf"part-000\.parquet row group 1: {why}"):
        s.next_batch()
    s.close()
    skip = spec_for(tmp_path, partitions=1, shuffle_window=10, on_bad_file="skip")
    s = Stream(skip, build_index(skip), rank=0, world_size=1, micro_batch_size=10, grad_accum_steps=1,
               vocab_size=vocab, log=[].append)
    batch = s.next_batch()
    s.close()
    assert s.stats()["skipped_row_groups"] == 1 and int((batch["targets"] == -100).all(dim=1).sum()) == 5


def test_a_stalled_read_ends_the_stream_naming_its_row_group_and_close_does_not_wait_for_it(tmp_path):
    import threading
    import time

    from shardrun.errors import DataStalled

    write_layout(tmp_path, [[10, 10]])
    spec = spec_for(tmp_path, partitions=1, shuffle_window=20)
    s = Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1,
               wait_timeout=0.5)
    released = threading.Event()
    s.reader.read = lambda g: released.wait(60)  # a mount that stopped answering
    try:
        t0 = time.monotonic()
        with pytest.raises(DataStalled, match=r"part-000\.parquet row group \d: no data after 0\.5 s "
                                              r"\(failure\.data_wait_timeout_s\)"):
            s.next_batch()
        assert time.monotonic() - t0 < 10  # raised, then closed without waiting for the stuck read
    finally:
        released.set()
        s.close()


def test_batches_for_a_gpu_are_pinned_contiguous_in_the_producer(tmp_path, monkeypatch):
    """A strided pinned tensor goes through pageable memory on its way to the GPU, and the non_blocking copy
    waits: the inputs and targets views of each row must be made contiguous before they are pinned."""
    pinned = []

    def pin(self):  # this machine has no CUDA to pin with: record what would be pinned
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    write_layout(tmp_path, [[10] * 4])
    spec = spec_for(tmp_path)
    stream = Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=2,
                    device="cuda")
    rows = np.arange(4 * ROW_LEN, dtype=np.int32).reshape(4, ROW_LEN)
    batches = stream._token_micro_batches(rows)
    assert len(pinned) == 4 and all(t.is_contiguous() for t in pinned)
    assert torch.equal(batches[1]["targets"], torch.from_numpy(rows[2:4, 1:]))
    on_cpu = Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=2)
    on_cpu._token_micro_batches(rows)
    assert len(pinned) == 4  # nothing pinned for the CPU, no copies made


# -- issue 19: data.seq_len from the files, inspect's partitions, rows shorter than seq_len ----------------


def _shard(path: Path, row_len: int, seq_len: int | None = None) -> None:
    """One fixed-size token file of 8 rows, with prepare-text's shardrun.seq_len metadata when given."""
    col = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8 * row_len, dtype=np.int32) % 200), row_len)
    table = pa.table({"tokens": col})
    if seq_len is not None:
        table = table.replace_schema_metadata({b"shardrun.seq_len": str(seq_len).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_an_unset_seq_len_is_taken_from_the_files_and_set_on_the_spec(corpus, tmp_path):
    spec = DataSpec(paths=[str(corpus)])
    assert spec.seq_len is None
    build_index(spec)
    assert spec.seq_len == 32  # what the workers get; datasets.open without an index builds one the same way
    _shard(tmp_path / "plain" / "a.parquet", row_len=9)  # no metadata: a fixed-size list's length less one
    spec = DataSpec(paths=[str(tmp_path / "plain")])
    build_index(spec)
    assert spec.seq_len == 8


def test_files_that_disagree_on_seq_len_or_record_none_are_named(tmp_path):
    _shard(tmp_path / "a" / "part-0.parquet", row_len=17, seq_len=16)
    _shard(tmp_path / "b" / "part-0.parquet", row_len=33, seq_len=32)
    with pytest.raises(UserError, match=r"^data.seq_len is unset and the files disagree on it: \S*a/part-0.parquet "
                                        r"has seq_len 16, \S*b/part-0.parquet has seq_len 32; set data.seq_len"):
        build_index(DataSpec(paths=[str(tmp_path / "a"), str(tmp_path / "b")]))
    pq.write_table(pa.table({"tokens": pa.array([[1, 2, 3]] * 4, pa.list_(pa.int32()))}), tmp_path / "v.parquet")
    with pytest.raises(UserError, match=r"v.parquet records none \(no shardrun.seq_len in its Parquet metadata, and "
                                        r"column 'tokens' is not a fixed-size list\); set data.seq_len"):
        build_index(DataSpec(paths=[str(tmp_path / "v.parquet")]))


def test_a_run_takes_seq_len_from_the_files_and_checks_it_against_the_model_before_training(tmp_path, corpus,
                                                                                           capsys):
    from shardrun import cli
    from shardrun.config import parse

    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: s\ndata: {{paths: [{corpus}]}}\nmodel: {{block_size: 16}}\nrun: {{max_steps: 1}}\n"
                    f"checkpoint: {{storage: {tmp_path}}}\n")
    assert cli.main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    with pytest.raises(UserError) as given:  # the error a spec that sets seq_len: 32 gets
        parse({"name": "s", "data": {"paths": [str(corpus)], "seq_len": 32}, "model": {"block_size": 16},
               "run": {"max_steps": 1}})
    assert str(given.value) == "job spec: data.seq_len (32) is longer than model.block_size (16)"
    assert ("shardrun: error: data.paths (data.seq_len unset, taken from the files): "
            "data.seq_len (32) is longer than model.block_size (16)") in err, err
    assert not (tmp_path / "s").exists()


def test_data_inspect_counts_steps_over_a_runs_default_partitions(corpus, capsys):
    from shardrun import cli

    assert cli.main(["data", "inspect", str(corpus), "--global-batch", "64"]) == 0
    assert "at a global batch of 64 over 2 partitions" in capsys.readouterr().out
    assert cli.main(["data", "inspect", str(corpus), "--global-batch", "64", "--partitions", "1"]) == 0
    assert "at a global batch of 64 over 1 partitions" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["data", "inspect", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: a run's, scaling.num_workers, 2 unless a spec sets it" in help_text


def test_rows_shorter_than_seq_len_suggest_a_shorter_seq_len_not_skipping_every_file(tmp_path):
    _shard(tmp_path / "d" / "part-0.parquet", row_len=17, seq_len=16)
    _shard(tmp_path / "d" / "part-1.parquet", row_len=17, seq_len=16)
    fix = r"set data.seq_len to 16 or less \(the rows' length less one\), or prepare the data again with --seq-len 32"
    with pytest.raises(UserError) as e:
        build_index(DataSpec(paths=[str(tmp_path / "d")], seq_len=32))
    assert "on_bad_file" not in str(e.value)
    assert e.match(r"part-0.parquet: rows of column 'tokens' hold 17 tokens, fewer than data.seq_len \+ 1 = 33; "
                   + fix)
    with pytest.raises(UserError, match=r"data.on_bad_file: skip left out every file of .*, so none is left to read "
                                        r"\(the first: .*part-0.parquet: rows of column 'tokens' hold 17 tokens.*\); "
                                        + fix):
        build_index(DataSpec(paths=[str(tmp_path / "d")], seq_len=32, on_bad_file="skip"))
    # one file of fitting rows among them: leaving the short one out is a fix that works
    _shard(tmp_path / "d" / "part-2.parquet", row_len=33, seq_len=32)
    with pytest.raises(UserError, match=r"part-0.parquet: .* = 33 \(data.on_bad_file: skip leaves it out\)$"):
        build_index(DataSpec(paths=[str(tmp_path / "d")], seq_len=32))
    assert build_index(DataSpec(paths=[str(tmp_path / "d")], seq_len=32, on_bad_file="skip")).rows == 8
