"""The driver's console: plain lines off a terminal, a status line redrawn in place on one (a real pty)."""

import io
import os
import pty

import pytest

from shardrun.driver.console import CLEAR, Console, bar_text
from shardrun.driver.run_log import RunLog


def _rec(step):
    return {"step": step, "samples": step * 2, "tokens": step * 100, "loss": 3.0 - step / 100,
            "lr": 1e-3, "tokens_per_s": 12345.0, "step_time": 0.5}


def _run(stream, **kw):
    """A run's console traffic, as the driver sends it: a start, 12 records at log_every 5, a note, the end."""
    emit = lambda line: print(f"[shardrun] {line}", file=stream, flush=True)  # noqa: E731 (as cli._emit)
    console = Console(emit, stream, max_steps=60, **kw)
    progress = RunLog(max_steps=60, byte_level=False)
    expected = [progress.on_start({"step": 0, "world_size": 1})]
    console.line(expected[0])
    for step in range(5, 65, 5):
        line = progress.on_record(_rec(step))
        console.update(_rec(step), line)
        expected.append(line)
        if step == 20:
            console.line("preemption: node n1 leaves")
            expected.append("preemption: node n1 leaves")
    console.close()
    return "".join(f"[shardrun] {line}\n" for line in expected)


@pytest.fixture
def tty(monkeypatch):
    """A pseudo-terminal's slave end as a text stream, and a reader of what reached it."""
    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    master, slave = pty.openpty()
    stream = open(slave, "w")
    chunks = []

    def read() -> str:
        os.set_blocking(master, False)
        while True:
            try:
                data = os.read(master, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode().replace("\r\n", "\n")  # the pty's ONLCR turns \n into \r\n

    assert stream.isatty()
    yield stream, read
    stream.close()
    os.close(master)


def test_off_a_terminal_every_line_is_printed_as_before(monkeypatch):
    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    out = io.StringIO()
    expected = _run(out)
    assert out.getvalue() == expected
    assert "\x1b" not in expected and expected.count("| loss ") == 12


def test_on_a_terminal_the_bar_is_redrawn_below_the_lines(tty):
    stream, read = tty
    _run(stream)
    out = read()
    assert out.endswith("\n")
    assert out.count(CLEAR) > 12
    assert "[#...................]  5/60   8% | loss 2.9500 | 12,345 tok/s | ETA 0m27s" in out
    assert f"{CLEAR}[##########..........] 30/60  50% | loss 2.7000" in out
    # what the screen keeps: every line of ours whole, on a line of its own, the final bar last
    screen = [line.rsplit(CLEAR, 1)[-1] for line in out.split("\n")]
    assert screen[0] == "[shardrun] starting with 1 worker"
    assert "[shardrun] preemption: node n1 leaves" in screen
    assert screen[-2].startswith("[####################] 60/60 100% | loss 2.4000") and screen[-1] == ""
    # permanent progress lines: the first, every 10th record, the last one; the bar shows the rest
    steps = [line.split("/")[0].split()[-1] for line in screen if line.startswith("[shardrun] step")]
    assert steps == ["5", "55", "60"]


def test_in_bar_mode_a_permanent_line_comes_at_least_every_so_many_seconds(tty):
    stream, read = tty
    _run(stream, seconds=0)
    screen = [line.rsplit(CLEAR, 1)[-1] for line in read().split("\n")]
    assert sum(line.startswith("[shardrun] step") for line in screen) == 12


def test_plain_on_a_terminal_when_asked(tty, monkeypatch):
    stream, read = tty
    monkeypatch.setenv("SHARDRUN_PROGRESS", "plain")
    expected = _run(stream)
    assert read() == expected


def test_a_dumb_terminal_gets_plain_lines_and_bar_can_be_forced(tty, monkeypatch):
    stream, read = tty
    monkeypatch.setenv("TERM", "dumb")
    expected = _run(stream)
    assert read() == expected
    monkeypatch.setenv("SHARDRUN_PROGRESS", "bar")
    out = io.StringIO()
    _run(out)
    assert CLEAR in out.getvalue()


def test_the_bar_fits_the_record_it_has():
    assert bar_text({"step": 0}, 300) == "[....................]   0/300   0%"
    assert bar_text({"step": 7, "loss": 1.0, "samples_per_s": 42.0}, 7) == \
        "[####################] 7/7 100% | loss 1.0000 | 42 samples/s"
