"""The driver's console: plain log lines, and on an interactive terminal one status line kept at the bottom.

On a terminal (stdout a tty, TERM not "dumb") the last step record is shown as a bar redrawn in place;
every other line is printed above it. In bar mode a record's plain progress line is still printed as a
permanent line, but only the first one, every 10th one, any one 60 s after the last, and the one at
max_steps, so the scrollback keeps a history without a line per record. Anywhere else (pipes, files,
`ray job submit` logs, CI) every line is printed as it always was. SHARDRUN_PROGRESS=plain or =bar
overrides the choice.

Lines that others write to the same terminal (Ray's forwarded worker logs, warnings on stderr) cannot be
kept off the bar's line; the bar is drawn again on a fresh line at the next record or line of ours.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TextIO

from shardrun.driver.run_log import format_duration

CLEAR = "\r\x1b[K"
"""Back to the line's start, and erase it."""

WIDTH = 20
"""Characters inside the bar's brackets."""


def wants_bar(stream: TextIO) -> bool:
    """Whether `stream` gets the status line: SHARDRUN_PROGRESS=bar|plain, else an interactive terminal."""
    mode = os.environ.get("SHARDRUN_PROGRESS", "").strip().lower()
    if mode in ("bar", "plain"):
        return mode == "bar"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        tty = False
    return tty and os.environ.get("TERM", "") != "dumb"


def bar_text(record: dict, max_steps: int) -> str:
    """`[#####.....]  150/300  50% | loss 2.3456 | 12,345 tok/s | ETA 1m02s`"""
    step = record.get("step", 0)
    done = min(1.0, max(0.0, step / max_steps)) if max_steps > 0 else 1.0
    filled = int(done * WIDTH)
    parts = [f"[{'#' * filled}{'.' * (WIDTH - filled)}] {step:>{len(str(max_steps))}}/{max_steps} "
             f"{int(done * 100):3d}%"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    elif record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if record.get("step_time"):
        parts.append(f"ETA {format_duration((max_steps - step) * record['step_time'])}")
    return " | ".join(parts)


class Console:
    """Lines for the run's log, through `emit` (which must write to `stream`), and the status line on `stream`."""

    def __init__(self, emit: Callable[[str], None], stream: TextIO, *, max_steps: int,
                 every: int = 10, seconds: float = 60.0):
        self.emit = emit
        self.stream = stream
        self.max_steps = max_steps
        self.every = every
        self.seconds = seconds
        self.bar = wants_bar(stream)
        self._status: str | None = None  # the bar's text, once there was a record
        self._since = 0  # records since the last permanent progress line
        self._last: float | None = None  # when that line was printed (monotonic)
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """A permanent line (a note, a warning, a restart), above the bar."""
        with self._lock:
            self._above(text)

    def update(self, record: dict, text: str) -> None:
        """A step record and its plain progress line."""
        with self._lock:
            if not self.bar:
                self.emit(text)
                return
            self._status = bar_text(record, self.max_steps)
            now = time.monotonic()
            self._since += 1
            if (self._last is None or self._since >= self.every or now - self._last >= self.seconds
                    or record.get("step", 0) >= self.max_steps):
                self._since, self._last = 0, now
                self._above(text)
            else:
                self._draw()

    def close(self) -> None:
        """The run ended: the bar stays as the last line, ended with a newline; later lines are plain."""
        with self._lock:
            if self.bar and self._status is not None:
                self._draw()
                self._write("\n")
            self.bar = False

    def _above(self, text: str) -> None:
        if self.bar and self._status is not None:
            self._write(CLEAR)
        self.emit(text)
        if self.bar and self._status is not None:
            self._draw()

    def _draw(self) -> None:
        self._write(CLEAR + self._status[: self._columns() - 1])

    def _columns(self) -> int:
        """The terminal's width (a longer line would wrap, and wrapped lines are not redrawn in place)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return columns if columns > 1 else 80

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
