"""The driver's view of training: rank 0 sends step records to an actor, the driver prints them."""

from __future__ import annotations

import threading

import ray

from shardrun.trainer.progress import Progress


@ray.remote(num_cpus=0)
class ProgressActor:
    """Holds the Progress of a run across worker-group restarts; lines wait here for the driver."""

    def __init__(self, max_steps: int, byte_level: bool):
        self.progress = Progress(max_steps=max_steps, byte_level=byte_level)
        self.lines: list[str] = []
        self.done = False

    def started(self, info: dict) -> None:
        self.lines.append(self.progress.on_start(info))

    def record(self, record: dict) -> None:
        self.lines.append(self.progress.on_record(record))

    def finished(self) -> None:
        self.done = True

    def drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def summary(self, checkpoint: str | None, wall_seconds: float) -> dict:
        return self.progress.summary(checkpoint=checkpoint, finished=self.done,
                                     wall_seconds=wall_seconds)


class ProgressPrinter:
    """A driver thread that prints the actor's lines as they come, until stopped."""

    def __init__(self, actor, emit, interval: float = 1.0):
        self.actor = actor
        self.emit = emit
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardrun-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()

    def flush(self) -> None:
        for line in ray.get(self.actor.drain.remote()):
            self.emit(line)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
