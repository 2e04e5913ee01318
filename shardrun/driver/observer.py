"""The run's driver-side bookkeeping, for both launchers: printed lines, metrics.jsonl, the job's
Prometheus series, the file_sd target file that lets Prometheus find every rank, and the experiment trackers
(shardrun.driver.tracking)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from shardrun import fs
from shardrun.config import JobSpec
from shardrun.driver.console import Console
from shardrun.driver.run_log import plural
from shardrun.errors import redact


class RunObserver:
    """Told when a worker group starts and at every log step; closed when the run ends.

    Lines go out through `emit`, which writes to `stream` (default sys.stdout): on a terminal a progress bar
    is kept there below them (shardrun.driver.console)."""

    def __init__(self, spec: JobSpec, emit: Callable[[str], None], *, serve: bool = True,
                 stream: TextIO | None = None):
        self.spec = spec
        self.console = Console(emit, sys.stdout if stream is None else stream, max_steps=spec.run.max_steps)
        self.emit = self.console.line
        self.job = None
        self.targets_path = os.path.join(spec.metrics.targets_dir, f"{spec.name}.json")
        self.jsonl_path = fs.join(spec.run_dir, "metrics.jsonl")
        self.groups = 0
        self._unwritten: list[str] = []
        """metrics.jsonl rows that storage refused so far, written with the next ones."""
        if spec.metrics.enabled and serve:
            from shardrun.metrics import JobMetrics

            self.job = JobMetrics(spec.metrics, run=spec.name)
        self.tracking = None
        if serve:
            from shardrun.driver.trackers import trackers

            chosen = trackers(spec)
            if chosen:
                from shardrun.driver.tracking import Tracking, flatten, run_tags

                self.tracking = Tracking(chosen, spec.run_dir, self.emit)
                self.tracking.start(flatten(spec.model_dump(mode="json")), run_tags(spec))

    def started(self, info: dict, line: str) -> None:
        self.emit(line)
        self.groups += 1
        if self.tracking is not None:  # a start, a restart, a resume, a resize: in the tracker at its step
            self.tracking.event(int(info.get("step", 0)), line)
        if self.job is not None:
            self.job.group_started(info["world_size"], restart=self.groups > 1)
        if self.spec.metrics.enabled:
            endpoints = info.get("endpoints") or []
            self.write_targets(endpoints)
            driver = f" and the run's own series (state, workers, restarts) at {self.job.address}" if self.job else ""
            self.emit(f"metrics: {plural(len(endpoints), 'rank')}{driver} listed for Prometheus in {self.targets_path}")

    def record(self, record: dict, line: str) -> None:
        if "eval_loss" in record:  # its own line, above the bar
            self.emit(line)
        else:
            self.console.update(record, line)
        if self.spec.metrics.jsonl:
            self._unwritten.append(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self._append_rows()
        if self.tracking is not None:
            self.tracking.record(record)

    def _append_rows(self) -> bool:
        """Append the rows not yet written; a storage error keeps them for the next try and is said once per
        outage (a log line never fails a run)."""
        failing = len(self._unwritten) > 1
        try:
            fs.append_text(self.jsonl_path, "".join(self._unwritten))
        except Exception as e:  # noqa: BLE001 - pyarrow's errors are OSError, ArrowException and more
            if not failing:
                self.emit(f"metrics.jsonl: cannot append to {self.jsonl_path} ({redact(str(e))}); its records "
                          "are kept here and written with the next ones")
            return False
        if failing:
            self.emit(f"metrics.jsonl: written again ({len(self._unwritten)} records held back are in)")
        self._unwritten.clear()
        return True

    def note(self, payload: dict, line: str) -> None:
        """A line from rank 0 that is no step record (a skipped step, a preemption notice)."""
        self.emit(line)

    def write_targets(self, endpoints: list[dict]) -> None:
        """<targets_dir>/<run>.json in Prometheus file_sd form, replaced whole (never half a file)."""
        groups = [{"targets": [e["address"]], "labels": {"run": self.spec.name, "rank": str(e["rank"]),
                                                          "node": e["node"]}} for e in endpoints]
        if self.job is not None:
            groups.append({"targets": [self.job.address], "labels": {"run": self.spec.name, "role": "driver"}})
        fs.write_json(self.targets_path, groups)

    def close(self, state: str) -> None:
        """The run ended (succeeded or failed): the bar ends, its targets leave Prometheus's discovery, the trackers
        get summary.json and close their run."""
        self.console.close()
        if self.tracking is not None:
            summary = fs.join(self.spec.run_dir, "summary.json")
            if not fs.is_uri(summary) and os.path.isfile(summary):
                self.tracking.artifact(summary)
            self.tracking.close(state)
        if self._unwritten and not self._append_rows():
            self.emit(f"metrics.jsonl: {len(self._unwritten)} records could not be written to {self.jsonl_path}")
        if self.job is not None:
            self.job.set_state(state)
        try:
            os.remove(self.targets_path)
        except FileNotFoundError:
            pass
        if self.job is not None:
            self.job.close()

