"""The driver's event channel: rank 0 sends its reports to an actor on the driver's node, and a driver thread
hands them to the run's observer. The actor outlives worker-group restarts, so the run log spans them."""

from __future__ import annotations

import threading

import ray

from shardrun.cluster.failures import RepeatCounter
from shardrun.driver.run_log import RunLog
from shardrun.errors import first_line, redact

MAX_RETRY_S = 60.0


@ray.remote(num_cpus=0)
class EventChannel:
    """Holds the RunLog of a run across worker-group restarts; lines wait here for the driver."""

    def __init__(self, max_steps: int, byte_level: bool, same_failure_limit: int = 0):
        self.log = RunLog(max_steps=max_steps, byte_level=byte_level)
        self.failures = RepeatCounter(same_failure_limit)
        self.events: list[tuple[str, dict, str]] = []
        self.done = False
        self.stop_reason: str | None = None
        self.stopped_early = False

    def started(self, info: dict) -> None:
        self.events.append(("started", info, self.log.on_start(info)))

    def record(self, record: dict) -> None:
        self.events.append(("record", record, self.log.on_record(record)))

    def note(self, line: str) -> None:
        self.events.append(("note", {}, line))

    def failed(self, rank: int, step: int | None, kind: str, message: str) -> str | None:
        """A rank's error, said on the console (Ray's forwarded traceback is kept off it); the message that
        ends the run if it repeats (RepeatCounter)."""
        where = f"after step {step}" if step is not None else "while starting"
        first = first_line(message)[:300]
        self.events.append(("note", {}, redact(f"rank {rank} failed {where}: {kind}: {first}")))
        return self.failures.failed(rank, step, kind, message)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def stopped(self) -> None:
        self.stopped_early = True

    def finished(self) -> None:
        self.done = True

    def take(self) -> list[tuple[str, dict, str]]:
        """(kind, payload, printed line) of every event since the last take."""
        events, self.events = self.events, []
        return events

    def summary(self, checkpoint: str | None, wall_seconds: float) -> dict:
        summary = self.log.summary(checkpoint=checkpoint, finished=self.done, wall_seconds=wall_seconds)
        if self.stopped_early:
            summary["stopped"] = self.stop_reason
        return summary


class EventForwarder:
    """A driver thread that hands the channel's events to a RunObserver as they come, until stopped."""

    def __init__(self, actor, observer, interval: float = 1.0):
        self.actor = actor
        self.observer = observer
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardrun-events", daemon=True)

    def __enter__(self) -> EventForwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - the run's outcome is the trainer's, not its last log lines'
            self.observer.note({}, f"progress: the last events could not be forwarded ({e!r})")

    def flush(self) -> None:
        for kind, payload, line in ray.get(self.actor.take.remote()):
            getattr(self.observer, kind)(payload, line)

    def _run(self) -> None:
        """Forward every interval; after an error, say so and try again later (up to a minute apart): the
        thread never ends before the run does."""
        wait, failing = self.interval, False
        while not self._stop.wait(wait):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - an actor call or an observer's write: neither ends the run
                if not failing:
                    self.observer.note({}, f"progress: could not forward the workers' events ({e!r}); retrying")
                wait, failing = min(wait * 2, MAX_RETRY_S), True
            else:
                wait, failing = self.interval, False
