"""Session fixtures shared by every layer of tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Byte-level token shards (seq_len 32) from the first ~400 KB of the standard library."""
    from shardrun.datasets.prepare import prepare_stdlib

    out = tmp_path_factory.mktemp("corpus") / "stdlib-32"
    prepare_stdlib(out, seq_len=32, max_bytes=400_000)
    return out
