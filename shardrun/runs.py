"""`shardrun runs STORAGE`: the runs in a storage location, each with its state, last step and loss,
newest complete checkpoint and when it last changed; the run dir a run name stands for (resolve_run_dir); and the
pruning of runs that `--fresh` moved aside.

A run dir is `<checkpoint.storage>/<name>`, on local disk or behind a URI (abfs://, s3://). The state
comes from the files alone: summary.json is written when a run ends (finished, stopped or failed). A run
without one newer than its metrics.jsonl is still going, or was cut off (its driver killed, its machine
lost): only the age of its files tells the two apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone

import pyarrow.fs as pafs

from shardrun import lease
from shardrun.checkpoint_format import RUN_CHECKPOINTS, newest_complete_step
from shardrun.errors import UserError, redact
from shardrun.fs import exists, filesystem, is_uri, join, log

RECENT_SECONDS = 300
"""A run with no current summary.json whose files changed this recently counts as running (the help of
`shardrun runs` says 5 minutes)."""
TAIL_BYTES = 64 * 1024
"""How much of the end of metrics.jsonl is read for its last record."""
MOVED_ASIDE = re.compile(r"\.replaced-\d{8}-\d{6}$")
"""The suffix fs.move_aside gives the earlier run that `--fresh` moved out of the way."""
_RUN_FILES = ("job.yaml", "metrics.jsonl", "summary.json")
KEEP_REPLACED = 3
"""Moved-aside run dirs that `shardrun runs --prune-replaced` keeps per name, newest first."""
NAMES_SHOWN = 20
"""Run names an error about a missing name lists at most."""


class Unreadable(Exception):
    """A run file that is there but cannot be parsed; the message says why."""


def list_runs(storage: str) -> list[dict]:
    """Every run dir directly under `storage`, by name (fields: see `describe`)."""
    location = storage if is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
    fs, root = filesystem(location)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise UserError(f"{redact(storage)} does not exist: STORAGE is where runs live (checkpoint.storage "
                        "of the job spec, e.g. ~/shardrun/runs), a path or a URI")
    if kind != pafs.FileType.Directory:
        raise UserError(f"{redact(storage)} is a file: STORAGE is the folder that holds the run dirs")
    if fs.get_file_info(f"{root.rstrip('/')}/job.yaml").type == pafs.FileType.File:
        raise UserError(f"{redact(storage)} is a run dir: STORAGE is the folder above it")
    runs = []
    entries = sorted(fs.get_file_info(pafs.FileSelector(root)), key=lambda e: e.base_name)
    leased = {e.base_name[: -len(lease.SUFFIX)] for e in entries if e.base_name.endswith(lease.SUFFIX)}
    for entry in entries:
        if entry.type == pafs.FileType.Directory:
            run_dir = join(location, entry.base_name)
            holder = lease.read(run_dir) if entry.base_name in leased else None
            run = describe(fs, entry.path, run_dir, holder)
            if run is not None:
                runs.append(run)
    return runs


def default_storage() -> str:
    """checkpoint.storage of a spec that does not set it (~/shardrun/runs)."""
    from shardrun.config import CheckpointSpec

    return CheckpointSpec().storage


def is_name(run: str) -> bool:
    """A bare run name: no `/`, no `://`, and no file or folder of that name here."""
    return "/" not in run and os.sep not in run and not is_uri(run) and not os.path.exists(os.path.expanduser(run))


def resolve_run_dir(run: str, storage: str | None = None, *, emit: Callable[[str], None] = log) -> str:
    """The run dir that RUN stands for: a path or URI as it is; a bare run name (is_name) as `<storage>/<name>`
    (storage: --storage, default the spec's default), said through emit (stderr). A name with no run dir there is
    a UserError that lists the run names there are."""
    if not run:
        raise UserError("RUN is empty: give a run name or a run dir (a path or URI)")
    if not is_name(run):
        return run
    storage = storage or default_storage()
    location = storage if is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
    run_dir = join(location, run)
    if exists(run_dir):
        emit(f"run dir: {run_dir}")
        return run_dir
    try:
        names = [r["name"] for r in list_runs(location)]
    except UserError as e:
        raise UserError(f"no run named {run}: {e}") from None
    if not names:
        there = "there are no runs there"
    else:
        more = f", and {len(names) - NAMES_SHOWN} more (shardrun runs {redact(location)})" \
            if len(names) > NAMES_SHOWN else ""
        there = f"runs there: {', '.join(names[:NAMES_SHOWN])}{more}"
    raise UserError(f"no run named {run} in {redact(location)} (RUN is a run name under --storage DIR, or a run dir's "
                    f"path or URI); {there}")


def prune_replaced(storage: str, keep: int = KEEP_REPLACED) -> list[str]:
    """Delete the run dirs that `--fresh` moved aside (NAME.replaced-TIME) but the newest `keep` of each name, on
    local storage (a URI is a UserError); returns the paths removed, oldest first within a name."""
    if keep < 0:
        raise UserError(f"--keep must be 0 or more (got {keep})")
    if is_uri(storage):
        raise UserError(f"--prune-replaced works on local storage only; {redact(storage)} is a URI: delete the "
                        "moved-aside runs (NAME.replaced-TIME) with the storage's own tools")
    root = os.path.abspath(os.path.expanduser(storage))
    if not os.path.isdir(root):
        raise UserError(f"{storage} is no folder: STORAGE is the folder that holds the run dirs")
    aside: dict[str, list[str]] = {}
    for entry in os.scandir(root):
        match = MOVED_ASIDE.search(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            aside.setdefault(entry.name[: match.start()], []).append(entry.name)
    removed = []
    for _, names in sorted(aside.items()):
        names.sort()  # one name, then the UTC time: oldest first
        for old in names[: max(0, len(names) - keep)]:
            path = os.path.join(root, old)
            shutil.rmtree(path)
            removed.append(path)
    return removed


def describe(fs: pafs.FileSystem, path: str, run_dir: str, holder: lease.Holder | None = None) -> dict | None:
    """A run dir's name, run_dir, state, moved_aside, step, loss, checkpoint (the newest complete one's step, or
    None) and modified (ISO 8601, UTC); None if it is no run. holder: its lease's, if it has one."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        entries = {e.base_name: e for e in fs.get_file_info(pafs.FileSelector(path))}
    except OSError as e:
        return _run(name, run_dir, state=f"unreadable: cannot list the folder ({e})")
    checkpointed = any(RUN_CHECKPOINTS.match(n) for n in entries)
    if not checkpointed and "job.yaml" not in entries and "metrics.jsonl" not in entries:
        return None
    summary_info, metrics_info = entries.get("summary.json"), entries.get("metrics.jsonl")
    problems: list[str] = []
    summary = _read(problems, "summary.json", lambda: _summary(fs, summary_info)) if summary_info else None
    last = _read(problems, "metrics.jsonl", lambda: _last_record(fs, metrics_info)) if metrics_info else None
    checkpoint = None
    if checkpointed:
        checkpoint = _read(problems, "checkpoints", lambda: newest_complete_step(run_dir))
    modified = max((e.mtime for n, e in entries.items() if (n in _RUN_FILES or RUN_CHECKPOINTS.match(n))
                    and e.mtime is not None), default=None)
    if problems:
        state = "unreadable: " + "; ".join(problems)
    else:
        state = _state(summary, summary_info, metrics_info, modified, holder)
    if last:
        step, loss = last["step"], last["loss"]
    else:
        step, loss = (summary.get("final_step"), summary.get("last_loss")) if summary else (None, None)
    return _run(name, run_dir, state=state, step=step, loss=loss, checkpoint=checkpoint,
                modified=modified.astimezone(timezone.utc).isoformat(timespec="seconds") if modified else None)


def _run(name: str, run_dir: str, *, state: str, step=None, loss=None, checkpoint=None, modified=None) -> dict:
    return {"name": name, "run_dir": redact(run_dir), "state": redact(state),
            "moved_aside": bool(MOVED_ASIDE.search(name)), "step": step, "loss": loss, "checkpoint": checkpoint,
            "modified": modified}


def _read(problems: list[str], what: str, reader: Callable[[], object]):
    """reader(), or None with "what: why" added to problems when it fails."""
    try:
        return reader()
    except (Unreadable, OSError, UserError) as e:
        problems.append(f"{what}: {e}")
        return None


def _summary(fs: pafs.FileSystem, info: pafs.FileInfo) -> dict:
    with fs.open_input_stream(info.path) as f:
        text = f.read().decode(errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Unreadable(f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"a JSON {type(data).__name__}, not an object")
    return data


def _last_record(fs: pafs.FileSystem, info: pafs.FileInfo) -> dict | None:
    """The last step record, read from the file's end (a last line still being written is left out, and so are
    evaluations' records); None for a file with no lines yet."""
    with fs.open_input_file(info.path) as f:
        size = f.size()
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read().decode(errors="replace")
    lines = tail.split("\n")[:-1]  # what follows the last newline is empty or still being written
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first may be cut
    for line in reversed(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Unreadable(f"the last line is not JSON ({e})") from None
        if isinstance(rec, dict) and "eval_loss" in rec and "loss" not in rec:
            continue  # an evaluation's record: the step record is before it
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or "loss" not in rec:
            raise Unreadable("the last line is no step record (it needs step and loss)")
        return rec
    if size > TAIL_BYTES:
        raise Unreadable(f"no complete line in the last {TAIL_BYTES} bytes")
    return None


def _state(summary: dict | None, summary_info: pafs.FileInfo | None, metrics_info: pafs.FileInfo | None,
           modified: datetime | None, holder: lease.Holder | None = None) -> str:
    """running (USER@HOST) while a live lease holds the run dir. Else from a current summary.json: finished,
    stopped (REASON), stopped or failed: ERROR. Without one (none, or one older than the last metrics row, left
    by an earlier invocation): interrupted if an expired lease is left (its holder is gone); with no lease (runs
    of shardrun before leases), running if the run's files changed in the last RECENT_SECONDS, else
    interrupted."""
    now = time.time()
    if holder is not None and lease.live(holder, now):
        return f"running ({holder.user}@{holder.host}{', job ' + holder.job if holder.job else ''})"
    current = summary is not None and not (metrics_info and metrics_info.mtime and summary_info.mtime
                                           and metrics_info.mtime > summary_info.mtime)
    if current:
        if summary.get("error"):
            return f"failed: {str(summary['error']).splitlines()[0]}"
        if summary.get("stopped"):
            return f"stopped ({summary['stopped']})"
        return "finished" if summary.get("finished") else "stopped"
    if holder is None and modified is not None and now - modified.timestamp() < RECENT_SECONDS:
        return "running"
    return "interrupted"


STATE_WIDTH = 60
"""The table cuts longer states (a failed run's error); --json gives them whole."""


def format_table(runs: list[dict], now: float | None = None) -> str:
    """Aligned columns: name, state, step, loss, checkpoint, age."""
    now = time.time() if now is None else now
    header = ("NAME", "STATE", "STEP", "LOSS", "CHECKPOINT", "AGE")
    rows = [header] + [_row(run, now) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:  # name and state to the left, the numbers to the right
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(run: dict, now: float) -> tuple[str, ...]:
    state = run["state"] + (", moved aside" if run["moved_aside"] else "")
    if len(state) > STATE_WIDTH:
        state = state[:STATE_WIDTH - 3] + "..."
    loss = run["loss"]
    checkpoint = run["checkpoint"]
    modified = run["modified"]
    return (run["name"], state, "-" if run["step"] is None else str(run["step"]),
            f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            "-" if checkpoint is None else str(checkpoint),
            "-" if modified is None else _age(now - datetime.fromisoformat(modified).timestamp()))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
