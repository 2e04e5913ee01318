"""What reaches the console besides shardrun's own lines: Ray forwards every worker's and actor's output to the
driver (`(RayTrainWorker pid=...) ...`), and DeepSpeed and Ray log their routine at every start, save and
resume. ConsoleFilter sits in sys.stdout and sys.stderr of a run's process and keeps out:

- every line Ray forwards from its workers and actors, except shardrun's own `[shardrun]` lines (printed
  without Ray's prefix). A worker's error still reaches the console: the driver says which rank failed and how
  (the event channel, and the run's last line), and `--verbose` shows the traceback;
- the routine lines of Ray and DeepSpeed in this process (ROUTINE), among them Ray Train's advice on an
  existing run folder, which is wrong for shardrun (a run of the same name resumes; `--fresh` starts over).

Colour codes go when the console is no terminal. `--verbose` lets every line through. Secrets are masked in
all of it (errors.redact). What was kept out is counted; the run's last line says how much and where it went.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import TextIO

from shardrun.driver.run_log import plural
from shardrun.errors import redact

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RAY_PREFIX = re.compile(r"^\((?P<who>[A-Za-z_][\w.]*)(?: pid=\d+)?(?:, ip=[^)]*)?\) ")
"""Ray's prefix on a forwarded line: `(RayTrainWorker pid=123)`, `(raylet)`, `(TrainController pid=9, ip=...)`."""
OURS = "[shardrun] "
ROUTINE = tuple(re.compile(p) for p in (
    r"Token authentication is enabled for this Ray cluster",  # ray.init, every run
    r"unique RunConfig\(name\)|delete the existing folder",  # Ray Train on resume: shardrun's answer is --fresh
    r"\[real_accelerator\.py:\d+:get_accelerator\]",  # DeepSpeed at import
    r"DeepSpeed \S+ built successfully",  # DeepSpeed's comm op, loaded from its cache every start
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(?:INFO|WARNING)\] \[(?:config_utils|logging|engine|torch)\.py",
    r"Ray deduplicates logs by default",
    # DeepSpeed's zero_to_fp32, gathering a checkpoint for export and generate
    r"^Processing zero checkpoint|^Parsing checkpoint created by deepspeed|^Detected checkpoint of type",
    r"^Reconstructed (?:Trainable )?fp32 state dict|^Loading checkpoint shards",
    r"^Writing model shards",  # transformers' save_pretrained (export --format hf)
    r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO (?:worker|node)\.py:\d+ -- ",  # ray.init's info lines
))


def routine(line: str) -> bool:
    """A routine line of Ray's or DeepSpeed's (colour codes already gone)."""
    return any(p.search(line) for p in ROUTINE)


class ConsoleFilter:
    """A text stream in front of `stream`: whole lines in, the console's lines out (see the module's doc).
    Writes that do not end a line wait for the rest of it, so that a line is judged whole."""

    def __init__(self, stream: TextIO, *, verbose: bool = False):
        self.stream = stream
        self.verbose = verbose
        try:
            self.colour = stream.isatty()
        except (AttributeError, ValueError):
            self.colour = False
        self.hidden = 0
        """Lines kept out so far."""
        self._after_hidden = False
        self._partial = ""
        # Ray's log thread and the driver write at once. Reentrant: a signal handler that prints (Ctrl-C's line)
        # runs in the main thread, perhaps while it is in here; a plain lock would wait for itself for good.
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            if "\n" not in self._partial:
                return len(text)
            *lines, self._partial = self._partial.split("\n")
            out = [kept for line in lines if (kept := self.judge(line)) is not None]
            if out:
                self.stream.write("".join(f"{line}\n" for line in out))
        return len(text)

    def judge(self, line: str) -> str | None:
        """The line as the console shows it, or None to keep it out. A line a progress bar redrew with carriage
        returns is judged, and shown, as a terminal would leave it: its last drawing; an empty line right after
        one kept out (a bar's last newline) goes with it."""
        kept = self._judge(line)
        if kept is not None and not kept.strip() and self._after_hidden:
            kept = None
        self._after_hidden = kept is None
        return kept

    def _judge(self, line: str) -> str | None:
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        plain = ANSI.sub("", line)
        shown = redact(line if self.colour else plain)
        if self.verbose:
            return shown
        forwarded = RAY_PREFIX.match(plain)
        if forwarded:
            rest = plain[forwarded.end():]
            if OURS in rest:
                return redact(rest[rest.index(OURS):])
            self.hidden += 1
            return None
        if routine(plain):
            self.hidden += 1
            return None
        return shown

    @property
    def raw(self) -> TextIO:
        """The stream behind the filter: for what redraws in place (the progress bar), which no line filter can
        judge."""
        return self.stream

    def flush(self) -> None:
        with self._lock:
            if self._partial:  # a last line without its newline
                kept = self.judge(self._partial)
                self._partial = ""
                if kept is not None:
                    self.stream.write(kept)
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def library_output_to_stderr(*, verbose: bool) -> Iterator[ConsoleFilter]:
    """Inside the block, what is printed to stdout (DeepSpeed's prints, and its logger when DeepSpeed is first
    imported here) and to stderr (its progress bars) goes to stderr through a ConsoleFilter: stdout stays for a
    command's result alone."""
    import sys

    err = ConsoleFilter(sys.stderr, verbose=verbose)
    try:
        with contextlib.redirect_stdout(err), contextlib.redirect_stderr(err):
            yield err
    finally:
        err.flush()


def install(*, verbose: bool) -> tuple[ConsoleFilter, ConsoleFilter]:
    """ConsoleFilters in sys.stdout and sys.stderr (Ray prints its forwarded lines through whatever they are
    when it prints); returns them."""
    import sys

    out, err = ConsoleFilter(sys.stdout, verbose=verbose), ConsoleFilter(sys.stderr, verbose=verbose)
    sys.stdout, sys.stderr = out, err
    return out, err


def hidden_line(filters: tuple[ConsoleFilter, ...]) -> str | None:
    """`N lines of Ray's and DeepSpeed's logging were kept off the console ...`, or None when none were."""
    count = sum(f.hidden for f in filters)
    if not count:
        return None
    return (f"{plural(count, 'line')} of Ray's, DeepSpeed's and the workers' own logging "
            f"{'was' if count == 1 else 'were'} kept off the console: "
            "--verbose shows them (a Ray run's are also under /tmp/ray/session_latest/logs)")
