"""Paths and storage, the bottom layer: local paths and URIs (abfs://, s3://) through pyarrow's filesystems,
durable whole-file writes, and shardrun's one log line printer (secrets redacted).

pyarrow is imported by the functions that touch storage, not at the top: every command parses its spec
(config uses the path functions), and most need no storage.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TextIO, TypeVar

from shardrun.errors import UserError, redact

if TYPE_CHECKING:
    import pyarrow.fs as pafs

T = TypeVar("T")


def is_uri(path: str) -> bool:
    """A URI (scheme://...), not a local path."""
    return "://" in path


def split_query(location: str) -> tuple[str, str]:
    """A URI's path part and its query with the `?` (`?enable_tls=false&sig=...`); a local path has none."""
    base, mark, query = location.partition("?") if is_uri(location) else (location, "", "")
    return base, mark + query


def join(location: str, *parts: str) -> str:
    """A path or URI with parts added to its path; a URI's query stays last."""
    base, query = split_query(location)
    return "/".join([base.rstrip("/"), *parts]) + query


def display_path(source: str, fs_path: str) -> str:
    """A file's name as the user would write it: the URI's scheme kept for remote files, secrets masked."""
    if not is_uri(source):
        return fs_path
    return redact(f"{source.split('://', 1)[0]}://{fs_path}")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's native filesystem for a local path or a URI (abfs://, s3://, ...), and the path inside it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise UserError(f"{redact(path)}: cannot open this storage location ({redact(str(e))})") from None
    return pafs.LocalFileSystem(), path


def is_local(fs: pafs.FileSystem) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def write_text(path: str, text: str) -> None:
    """Write a whole file, creating its folder; never half a file (write_bytes)."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file, creating its folder; never half a file: on local disk through a rename of a
    file already on the disk (fsync before, and of the folder after: a host that goes down keeps the old
    file or the new one), on object stores by their own rule (a blob or object appears only once its
    upload is complete)."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if not is_local(fs):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    tmp = f"{p}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    sync_dir(os.path.dirname(p) or ".")


def write_json(path: str, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def read_json(path: str) -> object | None:
    """A JSON file's content, or None when it is missing or no JSON (a file cut off counts as absent)."""
    text = read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def append_text(path: str, text: str) -> None:
    """Add to the end of a file: in place on local disk; object stores have no append, so the whole
    file is written again (through write_text, never half a file)."""
    fs, p = filesystem(path)
    if is_local(fs):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with open(p, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) or "") + text)


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


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


def follow_umask(folder: str) -> None:
    """Give a folder made by tempfile (0700, its files perhaps 0600), and everything in it, the modes the umask
    gives new ones: 0o777 & ~umask for folders, 0o666 & ~umask for files."""
    mask = os.umask(0o077)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def move_aside(path: str, label: str = "replaced", *, advice: str = "delete it") -> str:
    """Rename a folder or file out of the way, to `<path>.<label>-<UTC time>`, and return its new name; nothing
    is deleted. `advice` says what to do where the storage cannot rename it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base, query = split_query(path)
    new = f"{base.rstrip('/')}.{label}-{stamp}{query}"
    fs, p = filesystem(path)
    try:
        fs.move(p, filesystem(new)[1])
    except OSError as e:  # object stores without folders (Blob storage without a hierarchical namespace)
        raise UserError(f"cannot move {redact(path)} aside on this storage ({e}); {advice}") from None
    return new


def bounded(fn: Callable[[], T], seconds: float, stalled: Callable[[], Exception]) -> T:
    """fn() in a thread of its own, waited on for at most `seconds`: a call into storage that stops answering
    (a hung mount, an object store that no longer replies) raises stalled() here rather than hanging the
    caller. The stuck call stays behind in its daemon thread; the caller's process is meant to end."""
    done: dict = {}

    def call() -> None:
        try:
            done["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            done["error"] = e

    thread = threading.Thread(target=call, name="shardrun-bounded", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise stalled()
    if "error" in done:
        raise done["error"]
    return done["result"]


def log(line: str, *, file: TextIO | None = None) -> None:
    """One `[shardrun]` line, secrets masked, flushed (default: stderr)."""
    print(f"[shardrun] {redact(line)}", file=sys.stderr if file is None else file, flush=True)
