"""The stream on abfs:// (Azurite) and s3:// (moto) gives the very batches it gives on local disk."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from datagen import ROW_LEN, write_layout

from shardrun.config import DataSpec
from shardrun.datasets import Stream, build_index
from shardrun.errors import UserError

pytestmark = [pytest.mark.object_store, pytest.mark.timeout(120)]


@pytest.fixture(params=["s3_server", "azurite"])
def store(request):
    return request.getfixturevalue(request.param).fresh()


def _upload(local_dir, store, prefix):
    upload, root = store.filesystem()
    for f in sorted(local_dir.glob("*.parquet")):
        with open(f, "rb") as src, upload.open_output_stream(f"{root}/{prefix}/{f.name}") as dst:
            dst.write(src.read())


def _batches(spec, steps=6, world=2):
    index = build_index(spec)
    streams = [Stream(spec, index, rank=r, world_size=world, micro_batch_size=3, grad_accum_steps=2)
               for r in range(world)]
    try:
        return [[s.next_batch()["inputs"].tolist() for s in streams for _ in range(2)] for _ in range(steps)]
    finally:
        for s in streams:
            s.close()


def test_remote_stream_equals_the_local_one(tmp_path, store):
    write_layout(tmp_path, [[7, 9, 11], [13, 5]])
    _upload(tmp_path, store, "tokens")
    local = DataSpec(paths=[str(tmp_path)], seq_len=ROW_LEN - 1, partitions=2, shuffle_window=10)
    remote = local.model_copy(update={"paths": [store.uri("tokens")]})
    index = build_index(remote)
    assert index.rows == 45 and index.num_row_groups == 5
    assert index.files[0].name.startswith(f"{store.scheme}://") and "sig=" not in index.files[0].name
    assert _batches(remote) == _batches(local)


def test_a_corrupt_remote_file_is_named_and_skipped_on_request(tmp_path, store):
    write_layout(tmp_path, [[10, 10]])
    _upload(tmp_path, store, "bad")
    upload, root = store.filesystem()
    with upload.open_output_stream(f"{root}/bad/part-999.parquet") as out:
        out.write(b"PAR1 not parquet")
    spec = DataSpec(paths=[store.uri("bad")], seq_len=ROW_LEN - 1)
    with pytest.raises(UserError, match=rf"{store.scheme}://{store.container}/bad/part-999\.parquet: not a readable"):
        build_index(spec)
    skipped = build_index(spec.model_copy(update={"on_bad_file": "skip"}))
    assert skipped.rows == 20 and len(skipped.skipped) == 1
    assert pq.read_metadata(f"{root}/bad/part-000.parquet", filesystem=upload).num_rows == 20
