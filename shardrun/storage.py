"""Small file operations on a run's storage, local path or URI, through pyarrow's filesystems."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from shardrun.config import join
from shardrun.datasets.index import filesystem
from shardrun.errors import UserError

if TYPE_CHECKING:
    from shardrun.config import JobSpec


def write_text(path: str, text: str) -> None:
    """Write a whole file, creating its folder; never half a file: on local disk through a rename of a
    file already on the disk (fsync before, and of the folder after: a host that goes down keeps the old
    file or the new one), on object stores by their own rule (a blob or object appears only once its
    upload is complete)."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    tmp = f"{p}.tmp-{time.monotonic_ns()}"
    with open(tmp, "wb") as f:
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    sync_dir(os.path.dirname(p) or ".")


def sync_dir(path: str) -> None:
    """fsync a local folder: the names created, renamed or removed in it reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str, names: Iterable[str] | None = None) -> int:
    """fsync files under a local folder (names: relative paths; None: every file), then their folders up
    to root, so that a rename of root into place commits data that is on the disk. Returns the bytes."""
    folders, total = {root}, 0
    if names is None:
        walk = list(os.walk(root))
        folders.update(d for d, _, _ in walk)
        names = [os.path.relpath(os.path.join(d, f), root) for d, _, files in walk for f in files]
    for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            total += os.fstat(f.fileno()).st_size
        folder = os.path.dirname(path)
        while len(folder) > len(root) and folder not in folders:  # each folder between root and the file
            folders.add(folder)
            folder = os.path.dirname(folder)
    for folder in sorted(folders, key=len, reverse=True):
        sync_dir(folder)
    return total


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
