"""The driver's console: plain log lines, and on an interactive terminal a tqdm progress bar kept at the bottom.

On a terminal (the stream a tty, TERM not "dumb") the last step record is shown as a tqdm bar redrawn in
place; every other line is printed above it (tqdm's external_write_mode, as tqdm.write). In bar mode a
record's plain progress line is still printed as a permanent line, but only the first one, every 10th one,
any one 60 s after the last, and the one at max_steps, so the scrollback keeps a history without a line per
record. close() leaves the bar as the last line. Anywhere else (pipes, files, `ray job submit` logs, CI)
every line goes through `emit` as it always did and nothing else is written. SHARDRUN_PROGRESS=plain or
=bar overrides the choice.

Lines that others write to the same terminal (Ray's forwarded worker logs, warnings on stderr) cannot be
kept off the bar's line; the bar is drawn again on a fresh line at the next record or line of ours.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

from shardrun.driver.run_log import format_duration

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}"
"""tqdm's own look, with the record's stats for its rate and ETA (tqdm only sees the steps we set)."""


def wants_bar(stream: TextIO) -> bool:
    """Whether `stream` gets the bar: SHARDRUN_PROGRESS=bar|plain, else an interactive terminal."""
    mode = os.environ.get("SHARDRUN_PROGRESS", "").strip().lower()
    if mode in ("bar", "plain"):
        return mode == "bar"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        tty = False
    return tty and os.environ.get("TERM", "") != "dumb"


def bar_stats(record: dict, max_steps: int) -> str:
    """`loss 2.3456, 12,345 tok/s, ETA 1m02s`: the bar's postfix, from what the worker measured."""
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    elif record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if record.get("step_time"):
        parts.append(f"ETA {format_duration((max_steps - record.get('step', 0)) * record['step_time'])}")
    return ", ".join(parts)


def _columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a terminal
        return None


class Console:
    """Lines for the run's log, through `emit` (which must write to `stream`), and the bar on `stream`."""

    def __init__(self, emit: Callable[[str], None], stream: TextIO, *, max_steps: int,
                 every: int = 10, seconds: float = 60.0):
        self.emit = emit
        self.stream = getattr(stream, "raw", stream)  # the bar past the console's line filter (driver.noise)
        self.max_steps = max_steps
        self.every = every
        self.seconds = seconds
        self.bar = wants_bar(stream)
        self._tqdm: tqdm | None = None  # made at the first record, so lines before it need no clearing
        self._since = 0  # records since the last permanent progress line
        self._last: float | None = None  # when that line was printed (monotonic)
        self._lock = threading.Lock()  # tqdm's own lock guards its writes, not our counters

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
            now = time.monotonic()
            self._since += 1
            permanent = (self._last is None or self._since >= self.every or now - self._last >= self.seconds
                         or record.get("step", 0) >= self.max_steps)
            step, stats = record.get("step", 0), bar_stats(record, self.max_steps)
            if self._tqdm is not None:
                self._tqdm.n = step  # set, not added: a restart goes back to a checkpoint's step
                self._tqdm.set_postfix_str(stats)  # redraws
            if permanent:
                self._since, self._last = 0, now
                self._above(text)
            if self._tqdm is None:
                # position=0: never below another tqdm bar of this process. A pty nobody sized reports 0
                # columns, where tqdm would draw an empty bar: 80 columns then.
                sized = _columns(self.stream) != 0
                self._tqdm = tqdm(total=self.max_steps, initial=step, postfix=stats, file=self.stream,
                                  bar_format=BAR_FORMAT, ncols=None if sized else 80, dynamic_ncols=sized,
                                  position=0, leave=True)

    def close(self) -> None:
        """The run ended: the bar stays as the last line, ended with a newline; later lines are plain."""
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None
            self.bar = False

    def _above(self, text: str) -> None:
        if self._tqdm is None:
            self.emit(text)
            return
        with tqdm.external_write_mode(file=self.stream):
            self.emit(text)
