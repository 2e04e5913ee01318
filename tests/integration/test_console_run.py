"""What a user reads: the demo job, a few steps, through a pipe and in a pseudo-terminal. A pipe gets the banner,
shardrun's progress lines and the summary last, and no line of Ray's or DeepSpeed's routine logging, no colour
code; --verbose in a terminal brings the library lines back. (A worker's failure, said with its rank, is in
test_deterministic_errors.py.)"""

import os
import re
import select
import subprocess
import sys
import time

import pytest
from helpers import REPO, child_env, kill_group, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def demo_args(tmp_path) -> list[str]:
    return [sys.executable, "-m", "shardrun", "run", "examples/gpt-stdlib.yaml",
            "--set", f"checkpoint.storage={tmp_path / 'runs'}", "--set", f"data.paths=[{tmp_path / 'data'}]",
            "--set", "data.prepare.max_mb=1", "--set", "run.max_steps=6", "--set", "run.log_every=3",
            "--set", "checkpoint.every_steps=3", "--set", f"metrics.targets_dir={tmp_path / 'targets'}",
            "--set", "failure.scheduled_events=off"]


def test_a_piped_run_holds_the_banner_our_lines_and_the_summary_last(tmp_path):
    out = run(demo_args(tmp_path), timeout=300, cwd=REPO, env=child_env(SHARDRUN_PROGRESS="")).stdout
    lines = out.splitlines()
    assert lines[0].startswith("[shardrun] gpt-stdlib: GPT of 0.8 M parameters (4 layers x 128), fp32, ZeRO 2, "
                               "2 workers on CPU, 6 steps; run dir "), out
    assert all(line.startswith("[shardrun] ") for line in lines), out  # nothing of Ray's or DeepSpeed's
    assert "\x1b[" not in out
    steps = [line for line in lines if re.match(r"\[shardrun\] step +\d+/6 \|", line)]
    assert [s.split()[2] for s in steps] == ["1/6", "3/6", "6/6"], out
    assert lines[-2].startswith("[shardrun] finished: steps 0-6 in "), out
    assert re.match(r"\[shardrun\] \d+ lines of Ray's, DeepSpeed's and the workers' own logging were kept off "
                    r"the console: --verbose shows them", lines[-1]), out


def test_verbose_in_a_terminal_brings_the_library_lines_back(tmp_path):
    primary, secondary = os.openpty()
    proc = subprocess.Popen([*demo_args(tmp_path), "--verbose"], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=secondary, stderr=secondary, env=child_env(TERM="xterm", SHARDRUN_PROGRESS=""),
                            start_new_session=True)
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the terminal closed: the run is over
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
        os.close(primary)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "[shardrun] job spec, resolved:" in text and "micro_batch_size: 16" in text  # the whole spec
    assert "(RayTrainWorker pid=" in text and "\x1b[" in text  # Ray's lines, in colour on a terminal
    assert "[shardrun] finished: steps 0-6 in " in text and "kept off the console" not in text
