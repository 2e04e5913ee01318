"""Small file operations on a run's storage, local path or URI, through pyarrow's filesystems."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from shardrun.config import join
from shardrun.datasets.index import filesystem
from shardrun.errors import UserError

if TYPE_CHECKING:
    from shardrun.config import JobSpec


def write_text(path: str, text: str) -> None:
    """Write a whole file, creating its folder; never half a file: on local disk through a rename, on
    object stores by their own rule (a blob or object appears only once its upload is complete)."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    tmp = f"{p}.tmp-{time.monotonic_ns()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, p)


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def append_text(path: str, text: str) -> None:
    """Add to the end of a file: in place on local disk; object stores have no append, so the whole
    file is written again (through write_text, never half a file)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with open(p, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) or "") + text)


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def move_aside(path: str) -> str:
    """Rename a run folder out of the way (for --fresh) and return its new name; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base, mark, query = path.partition("?") if "://" in path else (path, "", "")
    new = f"{base.rstrip('/')}.replaced-{stamp}{mark}{query}"
    fs, p = filesystem(path)
    try:
        fs.move(p, filesystem(new)[1])
    except OSError as e:  # object stores without folders (Blob storage without a hierarchical namespace)
        raise UserError(f"--fresh cannot move {path} aside on this storage ({e}); delete it, or give the "
                        "run another name") from None
    return new


def prepare_run_dir(spec: JobSpec, *, fresh: bool, emit: Callable[[str], None]) -> None:
    """--fresh moves an earlier run of this name aside; the resolved spec is saved in the run dir."""
    if fresh and exists(spec.run_dir):
        emit(f"--fresh: moved the earlier run to {move_aside(spec.run_dir)}")
    write_text(join(spec.run_dir, "job.yaml"), spec.to_yaml())
