"""Stop a run cleanly on a signal: Ctrl-C (SIGINT), `ray job stop` and torchrun (SIGTERM), a closed terminal
(SIGHUP) each ask the workers to checkpoint at the next step and stop."""

from __future__ import annotations

import signal
from collections.abc import Callable

STOP_SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class StopSignals:
    """While the run trains: the first stop signal asks for a checkpoint at the next step and a stop; a second
    one of any kind stops at once (KeyboardInterrupt). The handlers before it are back when the block ends."""

    def __init__(self, request_stop: Callable[[str], object], emit: Callable[[str], None]):
        self.request_stop = request_stop
        self.emit = emit
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = STOP_SIGNALS[signum]
        again = "Ctrl-C" if signum == signal.SIGINT else self.received
        self.emit(f"stop requested ({self.received}): the workers checkpoint at the next step and stop; {again} "
                  "again stops at once, without a checkpoint")
        self.request_stop(self.received)


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
"""The exit status of a run stopped by a signal, after its checkpoint: as a shell shows a process it ended."""
