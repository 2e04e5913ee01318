"""Session fixtures shared by every layer of tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A developer's or Azure ML compute's MLflow server is never the tests': with MLFLOW_TRACKING_URI set, every
# run would log there (tracking.mlflow turns on by itself). The tracking tests start their own.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Byte-level token shards (seq_len 32) from the first ~400 KB of the standard library."""
    from shardrun.datasets.prepare import prepare_stdlib

    out = tmp_path_factory.mktemp("corpus") / "stdlib-32"
    prepare_stdlib(out, seq_len=32, max_bytes=400_000)
    return out


@pytest.fixture(scope="session")
def _loopback_not_proxied():
    """Requests to the local object stores must never go through an http(s)_proxy from the environment."""
    from servers import loopback_no_proxy

    with pytest.MonkeyPatch.context() as mp:
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, loopback_no_proxy(os.environ.get(name)))
        yield


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on 127.0.0.1 (SQLite backend, artifacts under tmp_path), stopped at the end:
    `.uri`, `.pause()` (it stops answering), `.resume()`."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, _loopback_not_proxied):
    """A fresh bucket on a moto S3 server on 127.0.0.1 (one server per session, killed at the end).

    Yields a `servers.ObjectStore`: `.uri(path)` is an s3:// URI with key, endpoint and scheme inside it,
    for `pyarrow.fs.FileSystem.from_uri` as is; `.env` holds the AWS_* variables for the environment
    route (not set by this fixture); `.filesystem()` gives (S3FileSystem, bucket) for uploads.
    """
    from servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server.new_store()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory, _loopback_not_proxied):
    """A fresh container on an Azurite blob server on 127.0.0.1 (one server per session, killed at the end).

    Yields a `servers.ObjectStore`: `.uri(path)` is an abfs:// URI with account, endpoint, enable_tls=false
    and a SAS token inside it, for `pyarrow.fs.FileSystem.from_uri` as is (pyarrow 26 takes no account key
    from a URI or the environment, so `.env` is empty); `.filesystem()` gives (AzureFileSystem, container).
    """
    from servers import AzuriteServer

    server = AzuriteServer(tmp_path_factory.mktemp("azurite"))
    try:
        yield server.new_store()
    finally:
        server.stop()
