"""A Spot eviction announced by Azure Scheduled Events (a fake metadata service on 127.0.0.1), then Ctrl-C
(SIGINT to the driver's whole process group, as a terminal sends it): each time every rank checkpoints at
the next step boundary; the eviction is acknowledged and the group resumes from that checkpoint by itself;
the Ctrl-C leaves a checkpoint to resume from and exits 130. (SIGTERM, as `ray job stop` sends it:
tests/integration/test_ray_job_submit.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from fake_imds import FakeMetadataServer
from helpers import child_env, kill_group, tiny_spec, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_preempt_checkpoints_acknowledges_and_resumes_then_ctrl_c_stops_with_a_checkpoint(tmp_path, corpus):
    with FakeMetadataServer(vm_name="shardrun_3") as imds:
        spec = write_spec(tmp_path / "job.yaml", tiny_spec(
            corpus, tmp_path / "runs", run={"max_steps": 400, "log_every": 1},
            checkpoint={"every_steps": 1000, "keep": 3},
            failure={"max_failures": 1, "scheduled_events": imds.endpoint}))
        proc = subprocess.Popen([sys.executable, "-m", "shardrun", "run", str(spec)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=child_env(), start_new_session=True)
        out: list[str] = []
        announced = saved = resumed_step = stop_sent = None
        try:
            for line in proc.stdout:
                out.append(line)
                if announced is None and "step      3/" in line:
                    imds.announce("Preempt", ["shardrun_30", "shardrun_3"], not_before_s=30)
                    announced = time.monotonic()
                if saved is None and "preemption: checkpoint of step" in line:
                    saved = time.monotonic()
                resumed = re.search(r"resuming from step (\d+) with 2 workers \(restart 1\)", line)
                if resumed:
                    resumed_step = int(resumed[1])
                if resumed_step and stop_sent is None and f"step {resumed_step + 2:>6}/" in line:
                    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
                    stop_sent = time.monotonic()
            proc.wait(timeout=60)
        finally:
            kill_group(proc)
        text = "".join(out)
        assert announced and saved and saved - announced < 30, text[-4000:]  # within the Preempt notice
        assert len(imds.acknowledged) == 1, text[-4000:]
    written = re.search(r"preemption: checkpoint of step (\d+) written", text)
    assert written and resumed_step == int(written[1]) >= 3, text[-4000:]
    assert stop_sent is not None and "stop requested (SIGINT)" in text, text[-4000:]
    assert proc.returncode == 130, text[-4000:]
    stopped = re.search(r"stop requested: checkpoint of step (\d+) written", text)
    assert stopped and int(stopped[1]) >= resumed_step + 2, text[-4000:]
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    assert summary["stopped"] == "SIGINT" and summary["restarts"] == 1 and not summary["finished"]
    assert "error" not in summary
    assert summary["final_step"] == int(stopped[1])
    assert (tmp_path / f"runs/tiny/checkpoint_{int(stopped[1]):08d}/shardrun.json").exists()
