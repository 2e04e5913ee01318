"""The driver's console: plain lines off a terminal, a tqdm bar kept below them on one (a real pty)."""

import fcntl
import io
import os
import pty
import struct
import termios
import threading

import pytest

from shardrun.driver.console import Console, bar_stats
from shardrun.driver.run_log import RunLog


def _rec(step):
    return {"step": step, "samples": step * 2, "tokens": step * 100, "loss": 3.0 - step / 100,
            "lr": 1e-3, "tokens_per_s": 12345.0, "step_time": 0.5}


def _printer(stream):
    return lambda line: print(f"[shardrun] {line}", file=stream, flush=True)  # as cli._emit


def _run(stream, emit=None, **kw):
    """A run's console traffic, as the driver sends it: a start, 12 records at log_every 5, a note, the
    end, the summary. Returns the lines, in order."""
    console = Console(emit or _printer(stream), stream, max_steps=60, **kw)
    log = RunLog(max_steps=60, byte_level=False)
    lines = [log.on_start({"step": 0, "world_size": 1})]
    console.line(lines[0])
    for step in range(5, 65, 5):
        lines.append(log.on_record(_rec(step)))
        console.update(_rec(step), lines[-1])
        if step == 20:
            lines.append("preemption: node n1 leaves")
            console.line(lines[-1])
    console.close()
    lines.append("finished")
    console.line(lines[-1])
    return lines


def _text(lines):
    return "".join(f"[shardrun] {line}\n" for line in lines)


def _screen(out: str) -> list[str]:
    """What a terminal shows for `out`: carriage returns overwrite, newlines move down."""
    assert "\x1b" not in out  # a bar at position 0 is drawn with \r alone
    rows, col = [""], 0
    for ch in out:
        if ch == "\n":
            rows.append("")
            col = 0
        elif ch == "\r":
            col = 0
        else:
            rows[-1] = rows[-1][:col] + ch + rows[-1][col + 1:]
            col += 1
    return [row.rstrip() for row in rows]


@pytest.fixture
def tty(monkeypatch):
    """A pseudo-terminal (80x24 unless `size` is None) as a text stream, and a reader of what reached it."""
    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    master, slave = pty.openpty()
    chunks = []

    def drain():  # the pty's buffer is small: read while the console writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the slave end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def open_stream(size=(24, 80)):
        if size:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        stream = open(slave, "w", encoding="utf-8")
        assert stream.isatty()
        return stream

    def read(stream) -> str:
        stream.close()
        reader.join(5)
        return b"".join(chunks).decode().replace("\r\n", "\n")  # the pty's ONLCR turns \n into \r\n

    yield open_stream, read
    os.close(master)


def test_off_a_terminal_every_line_is_printed_as_before(monkeypatch):
    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    r, w = os.pipe()
    with open(w, "w") as stream:
        lines = _run(stream)
    with open(r) as pipe:
        assert pipe.read() == _text(lines)
    assert sum("| loss " in line for line in lines) == 12


def test_off_a_terminal_only_emit_writes(monkeypatch):
    """Byte for byte as before the bar existed: one emit(text) per line, nothing else on the stream."""
    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    stream, emitted = io.StringIO(), []
    lines = _run(stream, emitted.append)
    assert emitted == lines and stream.getvalue() == ""


def test_on_a_terminal_the_bar_is_kept_below_the_lines(tty):
    open_stream, read = tty
    stream = open_stream()
    lines = _run(stream)
    out = read(stream)
    assert " 50%|" in out and "| 30/60, loss 2.7000, 12,345 tok/s, ETA 0m15s" in out
    drawn = [bar for bar in out.replace("\n", "\r").split("\r") if "%|" in bar]
    assert len(drawn) > 12 and all(len(bar) < 80 for bar in drawn)  # no bar wraps
    # what the screen keeps: the first, every 10th and the last progress line, the note, the final bar
    # ended by a newline, then plain lines
    screen = _screen(out)
    assert screen[:3] == [f"[shardrun] {line}" for line in lines[:2]] + ["[shardrun] preemption: node n1 leaves"]
    assert screen[3:5] == [f"[shardrun] {line}" for line in lines[-3:-1]]
    assert [line.split("/")[0].split()[-1] for line in screen[:5] if "| loss " in line] == ["5", "55", "60"]
    assert screen[5].startswith("100%|" + "█" * 20) and screen[5].endswith(
        "| 60/60, loss 2.4000, 12,345 tok/s, ETA 0m00s")
    assert screen[6:] == ["[shardrun] finished", ""]
    assert out.endswith("ETA 0m00s\n[shardrun] finished\n")


def test_a_terminal_that_reports_no_size_gets_80_columns(tty):
    open_stream, read = tty
    stream = open_stream(size=None)
    _run(stream)
    screen = _screen(read(stream))
    assert screen[5].startswith("100%|█") and len(screen[5]) == 80


def test_in_bar_mode_a_permanent_line_comes_at_least_every_so_many_seconds(tty):
    open_stream, read = tty
    stream = open_stream()
    _run(stream, seconds=0)
    assert sum(line.startswith("[shardrun] step") for line in _screen(read(stream))) == 12


@pytest.mark.parametrize(("variable", "value"), [("SHARDRUN_PROGRESS", "plain"), ("TERM", "dumb")])
def test_a_terminal_gets_plain_lines_when_asked_or_dumb(tty, monkeypatch, variable, value):
    open_stream, read = tty
    monkeypatch.setenv(variable, value)
    stream = open_stream()
    lines = _run(stream)
    assert read(stream) == _text(lines)


def test_the_bar_can_be_forced_where_no_terminal_is(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("SHARDRUN_PROGRESS", "bar")
    out = io.StringIO()
    _run(out)
    assert "\r100%|##########| 60/60, loss 2.4000, 12,345 tok/s, ETA 0m00s\n[shardrun] finished\n" in \
        out.getvalue()


def test_after_close_records_and_lines_are_plain(monkeypatch):
    monkeypatch.setenv("SHARDRUN_PROGRESS", "bar")
    out = io.StringIO()
    console = Console(_printer(out), out, max_steps=60)
    console.update(_rec(5), "step 5")
    console.close()
    end = len(out.getvalue())
    console.update(_rec(10), "step 10")
    console.line("finished")
    assert out.getvalue()[end:] == "[shardrun] step 10\n[shardrun] finished\n"


def test_lines_from_many_threads_stay_whole(monkeypatch):
    monkeypatch.setenv("SHARDRUN_PROGRESS", "bar")
    out = io.StringIO()
    console = Console(_printer(out), out, max_steps=400)

    def work(t):
        for i in range(50):
            console.update(_rec(t * 100 + i), f"step {t}-{i}")
            console.line(f"note {t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    console.close()
    screen = _screen(out.getvalue())
    assert sorted(row for row in screen if row.startswith("[shardrun] note")) == \
        sorted(f"[shardrun] note {t}-{i}" for t in range(4) for i in range(50))
    assert all(row.startswith("[shardrun] ") for row in screen[:-2]) and screen[-1] == ""


def test_the_bar_shows_what_the_record_has():
    assert bar_stats({"step": 0}, 300) == ""
    assert bar_stats({"step": 7, "loss": 1.0, "samples_per_s": 42.0}, 7) == "loss 1.0000, 42 samples/s"
    assert bar_stats(_rec(150), 300) == "loss 1.5000, 12,345 tok/s, ETA 1m15s"
