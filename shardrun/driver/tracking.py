"""Experiment tracking from the driver, off the training path: the records rank 0 sends the driver (the rows of
metrics.jsonl) go to the run's trackers (MLflow, TensorBoard, Weights & Biases: shardrun.driver.trackers) through
a bounded queue and one thread, so that a tracker that is slow or down costs training nothing: what does not fit
the queue is dropped and counted, a tracker's first error is said once, and what could not be sent is said at the
end.

One tracked run however often the run restarts: each tracker's run id is kept in <run dir>/tracking.json with the
last step it was sent, and a worker-group restart, an elastic resize or a resubmission of the same name continues
that run; records of steps already sent (a resume from an earlier checkpoint trains them again) are not sent
twice, so a tracker's steps never go backwards.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from textwrap import shorten
from typing import Any, Protocol

from shardrun import fs
from shardrun.driver.run_log import plural
from shardrun.errors import redact

GIT_REVISION_ENV = "SHARDRUN_GIT_REVISION"
"""The git revision of the folder `shardrun submit` uploaded (its .git stays behind), for the driver's tags."""
RECORD_FILE = "tracking.json"
"""In the run dir: each tracker's run id and the last step sent to it."""
QUEUE_SIZE = 10_000
"""Records waiting for the trackers at most; beyond it a record is dropped (a tracker that has stopped answering)."""
RECORD_EVERY_S = 30.0
"""How often tracking.json is written while the run goes (the last step sent to each tracker)."""
SEND_EVERY_S = 1.0
"""A tracker is sent metrics once a second at most: the records that come meanwhile go in one call (MLflow's client
costs rank 0's process ~20 ms of CPU a call, on the training path where the driver is rank 0's process)."""
BATCH_MAX = 1000
"""Records in one call at most."""
_NOTHING = object()
CLOSE_TIMEOUT_S = 30.0
"""At the end of the run, how long the driver waits for the trackers to take what is queued."""
CLOSE_GRACE_S = 2.0
"""At the end of the run, how long a tracker may take what is queued before the wait is said."""
RECORD_KINDS = frozenset({"metrics", "event", "artifact"})
"""What the trackers are sent that counts as a record (said when lost); the run's open, parameters, tags and close
are not."""
NOT_METRICS = frozenset({"time", "step", "samples", "tokens", "eval_tokens", "eval_batches", "eval_seconds"})
"""Record keys that are no metric of their own (the step is the trackers' step; counters are in summary.json)."""


KNOWN_ERRORS = (("timed out", "no answer in time"), ("connection refused", "connection refused"),
                ("name or service not known", "no such host"), ("failure in name resolution", "no such host"))
"""Network errors said in a few words (a client's own message for them runs to hundreds of characters)."""


def describe(error: Exception) -> str:
    """A tracker's error in a line: its type, and what happened."""
    text = " ".join(str(error).split())
    said = next((words for needle, words in KNOWN_ERRORS if needle in text.lower()), None)
    return f"{type(error).__name__}: {said or shorten(redact(text), 300, placeholder=' [...]')}"


def kept_runs(run_dir: str) -> dict[str, Any]:
    """tracking.json of a run dir: {tracker name: {run_id, last_step, time}}; {} where there is none yet."""
    try:
        text = fs.read_text(fs.join(run_dir, RECORD_FILE))
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


class Tracker(Protocol):
    """One experiment tracker (shardrun.driver.trackers): every call may block or raise; Tracking calls them from its
    own thread, one at a time."""

    name: str
    """`mlflow`, `tensorboard`, `wandb`: the key of its entry in tracking.json and of its lines."""

    def open(self, run_id: str | None) -> str | None:
        """Start its run, or continue the one of run_id; returns its run id (None where it has none)."""

    def where(self) -> str:
        """Once open: where its run is (a link, a folder), for the line that says so."""

    def params(self, params: dict[str, str]) -> None: ...

    def tags(self, tags: dict[str, str]) -> None: ...

    def metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Records' metrics at their steps (which go up), in one call where the tracker has one."""

    def event(self, step: int, text: str) -> None: ...

    def artifact(self, path: str) -> None: ...

    def close(self, state: str) -> None: ...


def metric_values(record: dict) -> dict[str, float]:
    """A record's metrics under metrics.jsonl's names: its finite numbers, bookkeeping left out."""
    return {k: float(v) for k, v in record.items() if k not in NOT_METRICS and isinstance(v, int | float)
            and not isinstance(v, bool) and math.isfinite(v)}


def run_tags(spec) -> dict[str, str]:
    """The run's name, shardrun's and its libraries' versions (CUDA's: the one torch was built for), and the git
    revision of the working directory (where the job was launched from; `shardrun submit` passes its own, as the
    upload leaves .git out), as tracker tags."""
    import importlib.metadata

    tags = {"shardrun.run": spec.name}
    for package in ("shardrun", "torch", "deepspeed", "ray", "transformers", "peft"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        tags["version.cuda"] = torch.version.cuda or "none (a CPU build of torch)"  # the CUDA torch was built for
    except ImportError:
        pass
    revision = os.environ.get(GIT_REVISION_ENV) or git_revision()
    if revision:
        tags["git.revision"] = revision
    return tags


def git_revision(folder: str | None = None) -> str | None:
    """The commit checked out in folder (default: here), None outside a git checkout."""
    import subprocess

    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def flatten(spec: dict, prefix: str = "") -> dict[str, str]:
    """The resolved spec as tracker parameters: `deepspeed.zero_stage: 2`, lists as JSON, None as `null` (secrets
    masked: errors.redact)."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact(value if isinstance(value, str) else json.dumps(value))
    return out


@dataclass
class _State:
    """One tracker, its queue and its thread."""

    tracker: Tracker
    queue: queue.Queue
    run_id: str | None = None
    last_step: int = -1
    """The highest step sent (a record at or below it is not sent again)."""
    failed: str | None = None
    """The first error, said once."""
    unsent: int = 0
    """Records it raised on, or that came before it opened."""
    dropped: int = 0
    """Records that found its queue full."""
    sent_at: float = -math.inf
    """When its last metrics were sent (monotonic)."""
    queued: int = 0
    """Records put in its queue (counted by the driver's thread alone)."""
    done: int = 0
    """Records its thread is through with, sent or not (counted by that thread alone): queued - done are waiting."""
    opened: bool = False
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class _Item:
    kind: str
    args: tuple
    step: int | None = None


class Tracking:
    """The run's trackers, each behind a bounded queue and a thread of its own (one that stops answering holds up
    no other). Every method but close returns at once."""

    def __init__(self, trackers: list[Tracker], run_dir: str, emit: Callable[[str], None], *,
                 queue_size: int = QUEUE_SIZE):
        self.run_dir, self.emit, self.queue_size = run_dir, emit, queue_size
        self._states = [_State(t, queue.Queue(queue_size)) for t in trackers]
        self._lock = threading.Lock()
        self._written_at = time.monotonic()

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        """Open (or continue) each tracker's run with the spec's parameters and the run's tags, on its thread."""
        kept = kept_runs(self.run_dir)
        for state in self._states:
            state.run_id = kept.get(state.tracker.name, {}).get("run_id")
            state.last_step = kept.get(state.tracker.name, {}).get("last_step", -1)
            state.thread = threading.Thread(target=self._work, args=(state,), daemon=True,
                                            name=f"shardrun-tracking-{state.tracker.name}")
            state.thread.start()
        self._put(_Item("open", ()))
        self._put(_Item("params", (params,)))
        self._put(_Item("tags", (tags,)))

    def record(self, record: dict) -> None:
        """A metrics.jsonl record: its metrics at its step."""
        values = metric_values(record)
        if values and "step" in record:
            self._put(_Item("metrics", (values,), step=int(record["step"])))

    def event(self, step: int, text: str) -> None:
        """A restart, a resize, a resume: text at a step."""
        self._put(_Item("event", (text,), step=step))

    def artifact(self, path: str) -> None:
        """A file (summary.json, the report, an export) uploaded as it is now."""
        self._put(_Item("artifact", (path,)))

    def close(self, state: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close each tracker's run after what is queued, waiting timeout_s at most in all; say what was not sent."""
        deadline = time.monotonic() + timeout_s
        said: set[str] = set()

        def say_wait(s: _State) -> None:  # why the end of the run waits, once per tracker
            waiting = s.queued - s.done
            if waiting and s.tracker.name not in said:
                said.add(s.tracker.name)
                self.emit(f"tracking: waiting up to {max(0.0, deadline - time.monotonic()):.0f} s for "
                          f"{s.tracker.name} to take {plural(waiting, 'record')} more")

        for s in self._states:
            if s.failed or s.dropped:  # known to be in trouble, and its queue may be full
                say_wait(s)
        for s in self._states:  # the close and the end are never dropped: they wait for room, to the deadline
            try:
                for item in (_Item("close", (state,)), None):
                    s.queue.put(item, timeout=max(0.001, deadline - time.monotonic()))
            except queue.Full:
                pass
        grace = min(deadline, time.monotonic() + CLOSE_GRACE_S)
        for s in self._states:  # a tracker that answers is through in a moment
            if s.thread is not None:
                s.thread.join(max(0.0, grace - time.monotonic()))
        for s in self._states:
            if s.thread is not None and s.thread.is_alive():
                say_wait(s)
                s.thread.join(max(0.0, deadline - time.monotonic()))
        for s in self._states:
            lost = s.unsent + s.dropped + (s.queued - s.done)  # failed, dropped, and queued or in flight still
            if lost or s.failed:
                why = s.failed or "it did not answer"
                self.emit(f"tracking: {lost} of the run's records did not reach {s.tracker.name} ({why}); "
                          "metrics.jsonl in the run dir has them all")
        self._write_record()

    def _put(self, item: _Item) -> None:
        for s in self._states:
            try:
                s.queue.put_nowait(item)
                s.queued += item.kind in RECORD_KINDS
            except queue.Full:
                s.dropped += 1
                if s.dropped == 1:
                    self.emit(f"tracking: {s.tracker.name} is {self.queue_size:,} records behind; its records are "
                              "dropped until it catches up (training goes on)")

    def _work(self, state: _State) -> None:
        held: Any = _NOTHING
        while True:
            item = state.queue.get() if held is _NOTHING else held
            held = _NOTHING
            if item is None:
                return
            batch = [item]
            if item.kind == "metrics":  # with the records that come until SEND_EVERY_S after its last send: one call
                held = self._gather(state, batch)
            self._send(state, batch)
            if item.kind == "metrics":
                state.sent_at = time.monotonic()
            state.done += sum(i.kind in RECORD_KINDS for i in batch)

    @staticmethod
    def _gather(state: _State, batch: list[_Item]) -> Any:
        """More metrics records into batch, until SEND_EVERY_S after the tracker's last send (or BATCH_MAX of them);
        returns the item that ended it (another kind, or the end's None), or _NOTHING."""
        until = state.sent_at + SEND_EVERY_S
        while len(batch) < BATCH_MAX:
            left = until - time.monotonic()
            try:
                item = state.queue.get(timeout=left) if left > 0 else state.queue.get_nowait()
            except queue.Empty:
                return _NOTHING
            if item is None or item.kind != "metrics":
                return item
            batch.append(item)
        return _NOTHING

    def _send(self, state: _State, batch: list[_Item]) -> None:
        """One item, or a batch of metrics records, to the tracker; what it raises is said once and counted."""
        tracker, item = state.tracker, batch[0]
        if item.kind != "open" and not state.opened:
            state.unsent += sum(i.kind in RECORD_KINDS for i in batch)
            return
        rows, top = [], state.last_step
        for record in batch if item.kind == "metrics" else ():
            if record.step > top:  # a step sent before (a resume from an earlier checkpoint trains it again) is
                rows.append((record.step, record.args[0]))  # not sent twice: a tracker's steps never go backwards
                top = record.step
        try:
            if item.kind == "open":
                kept, state.run_id = state.run_id, tracker.open(state.run_id)
                state.opened = True
                self._write_record()
                self.emit(f"tracking: {'continuing ' if kept and kept == state.run_id else ''}{tracker.where()}")
            elif item.kind == "metrics":
                if rows:
                    tracker.metrics(rows)
                    state.last_step = top
                    if time.monotonic() - self._written_at > RECORD_EVERY_S:
                        self._write_record()
            elif item.kind == "event":
                tracker.event(item.step, *item.args)
            else:
                getattr(tracker, item.kind)(*item.args)
        except Exception as e:  # noqa: BLE001 - a tracker's client raises anything; training never hears of it
            state.unsent += len(rows) if item.kind == "metrics" else item.kind in RECORD_KINDS
            if state.failed is None:
                state.failed = describe(e)
                self.emit(f"tracking: {tracker.name} failed ({state.failed}); training goes on, and what it does "
                          "not take is counted")

    def _write_record(self) -> None:
        """tracking.json: each opened tracker's run id and last step (from any tracker's thread, or close)."""
        with self._lock:
            self._written_at = time.monotonic()
            record = {s.tracker.name: {"run_id": s.run_id, "last_step": s.last_step, "time": round(time.time(), 3)}
                      for s in self._states if s.opened or s.run_id}
            self._write(record)

    def _write(self, record: dict) -> None:
        try:
            fs.write_json(fs.join(self.run_dir, RECORD_FILE), record)
        except OSError as e:
            self.emit(f"tracking: cannot write {RECORD_FILE} in the run dir ({redact(str(e))}); a restart starts "
                      "new tracked runs")
