"""The local object stores (moto S3, Azurite) work through pyarrow's native filesystems, URIs as they are."""

from __future__ import annotations

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs

pytestmark = [pytest.mark.object_store, pytest.mark.timeout(60)]

STORES = ["s3_server", "azurite"]
# What each service says to a request signed with the wrong secret.
REFUSAL = {"s3_server": "SIGNATURE_DOES_NOT_MATCH", "azurite": "403"}


def _table(n: int = 1000) -> pa.Table:
    return pa.table({"id": pa.array(range(n), pa.int64()), "tok": pa.array([i % 251 for i in range(n)], pa.int32())})


@pytest.fixture(params=STORES)
def store(request):
    return request.getfixturevalue(request.param)


def test_uri_lists_and_reads_parquet_uploaded_through_the_filesystem(store, request):
    upload, root = store.filesystem()
    table = _table()
    pq.write_table(table, f"{root}/listing/part-0.parquet", filesystem=upload, row_group_size=250)
    pq.write_table(table.slice(0, 10), f"{root}/listing/part-1.parquet", filesystem=upload)

    filesystem, path = fs.FileSystem.from_uri(store.uri("listing"))
    assert path == f"{store.container}/listing"
    infos = filesystem.get_file_info(fs.FileSelector(path))
    assert sorted(i.base_name for i in infos) == ["part-0.parquet", "part-1.parquet"]
    assert all(i.type == fs.FileType.File and i.size > 0 for i in infos)

    pf = pq.ParquetFile(f"{path}/part-0.parquet", filesystem=filesystem)
    assert pf.metadata.num_row_groups == 4
    assert pf.read_row_group(2).equals(table.slice(500, 250))
    assert pf.read().equals(table)


def test_uri_filesystem_writes_what_the_upload_filesystem_reads(store):
    filesystem, path = fs.FileSystem.from_uri(store.uri("written/by-uri.parquet"))
    pq.write_table(_table(50), path, filesystem=filesystem)

    upload, root = store.filesystem()
    assert pq.read_table(f"{root}/written/by-uri.parquet", filesystem=upload).equals(_table(50))


def test_wrong_key_is_refused(store, request):
    upload, root = store.filesystem()
    pq.write_table(_table(10), f"{root}/secret/a.parquet", filesystem=upload)

    filesystem, path = fs.FileSystem.from_uri(store.uri_with_wrong_key("secret"))
    with pytest.raises(OSError, match=REFUSAL[request.node.callspec.params["store"]]):
        filesystem.get_file_info(fs.FileSelector(path))
    with pytest.raises(OSError):
        pq.ParquetFile(f"{path}/a.parquet", filesystem=filesystem)


def test_s3_credentials_from_the_environment(s3_server, monkeypatch):
    upload, bucket = s3_server.filesystem()
    pq.write_table(_table(10), f"{bucket}/env/a.parquet", filesystem=upload)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)

    # Endpoint in the query, key from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    filesystem, path = fs.FileSystem.from_uri(s3_server.uri("env", credentials=False))
    assert "@" not in s3_server.uri("env", credentials=False)
    assert [i.base_name for i in filesystem.get_file_info(fs.FileSelector(path))] == ["a.parquet"]
    # A plain s3:// URI, endpoint from AWS_ENDPOINT_URL_S3: how a user points at MinIO or similar.
    filesystem, path = fs.FileSystem.from_uri(f"s3://{bucket}/env/a.parquet")
    assert pq.read_table(path, filesystem=filesystem).equals(_table(10))


def test_fresh_gives_an_empty_container_of_its_own(store):
    other = store.fresh()
    assert other.container != store.container
    filesystem, path = fs.FileSystem.from_uri(other.base)
    assert path == other.container
    assert filesystem.get_file_info(fs.FileSelector(path)) == []


def test_servers_listen_on_loopback_only(store):
    proc = psutil.Process(store.server.process.proc.pid)
    listening = [c.laddr for p in [proc, *proc.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "the server process listens on nothing"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}
    assert store.server.port in {addr.port for addr in listening}
