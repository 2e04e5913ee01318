"""What a rank does when training goes wrong: a loss that is not finite (failure.nonfinite_loss), and a
peer that hangs (failure.collective_timeout_s). Faults come from SHARDRUN_FAULT (shardrun.trainer.faults)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from helpers import child_env, free_port, kill_group, run, tiny_spec, write_spec

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def train(spec_path, *, fault: str, nproc: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}"] if nproc > 1 else [sys.executable]
    return run([*launcher, "-m", "shardrun", "train", str(spec_path)], timeout=240,
               env=child_env(SHARDRUN_FAULT=fault), check=False)


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, corpus):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(corpus, tmp_path / "runs", run={"max_steps": 6, "log_every": 1},
                                                         checkpoint={"every_steps": 6}))
    done = train(spec, fault="nonfinite-loss:step=3:rank=1", nproc=2)
    assert done.returncode == 0, done.stdout[-4000:]
    assert ("step 3: the loss or the gradients are not finite; DeepSpeed skipped the update (1 in a row, 1 in "
            "this run so far)") in done.stdout
    # the window of step 3 had no finite loss to show; the weights never saw the NaN
    assert "step      3/6 | loss nan" in done.stdout and "step      4/6 | loss nan" not in done.stdout
    [states] = (tmp_path / "runs/tiny/checkpoints/step_00000006").glob("global_step*/mp_rank_00_model_states.pt")
    weights = torch.load(states, weights_only=False)["module"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nonfinite_loss_that_deepspeed_applies_stops_the_run_with_the_reason(tmp_path, corpus):
    """ZeRO stage 0 in fp32 applies every update (DeepSpeed's behaviour, not ours); the rest of the policy
    (failure.nonfinite_loss, max_nonfinite_steps) is decided below DeepSpeed: tests/unit/test_loop.py."""
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": 1}, deepspeed={"zero_stage": 0},
        run={"max_steps": 8, "log_every": 1}))
    done = train(spec, fault="nonfinite-loss:step=3-8")
    assert done.returncode == 1, done.stdout[-4000:]
    assert ("shardrun: TrainingDiverged: step 3: the loss is nan; with ZeRO stage 0 in fp32 DeepSpeed applies "
            "updates") in done.stdout, done.stdout[-4000:]


def test_a_hung_rank_fails_the_group_after_the_collective_timeout(tmp_path, corpus):
    """Rank 1 stops itself (SIGSTOP) after step 4; rank 0's next collective gives up after 5 s, not gloo's 30 min.

    The two ranks are started here, with torchrun's variables, not by torchrun: its agent would then wait 30 s
    for the stopped rank to take a SIGTERM before it kills it, which is torchrun's business, not this test's."""
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", run={"max_steps": 50, "log_every": 1}, checkpoint={"every_steps": 100},
        failure={"scheduled_events": "off", "collective_timeout_s": 5}))
    port, ranks = free_port(), []
    try:
        for rank in (0, 1):
            env = child_env(SHARDRUN_FAULT="stall:step=4:rank=1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
            ranks.append(subprocess.Popen([sys.executable, "-m", "shardrun", "train", str(spec)], env=env,
                                          stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
        t0 = time.monotonic()
        out, _ = ranks[0].communicate(timeout=180)
        assert ranks[0].returncode != 0 and time.monotonic() - t0 < 180, out[-4000:]
        assert ("rank 0 waited more than failure.collective_timeout_s (5 s) at step 4 for another rank, which "
                "died or hangs") in out, out[-4000:]
        assert psutil.Process(ranks[1].pid).status() == psutil.STATUS_STOPPED  # hung, not dead
    finally:
        for proc in ranks:
            kill_group(proc)
            proc.wait(timeout=30)


def test_ctrl_c_checkpoints_the_next_step_and_stops_with_130(tmp_path, corpus):
    """`shardrun train` in a terminal: Ctrl-C (SIGINT to the process group) checkpoints and stops, as in
    tests/integration/test_preempt_and_stop.py for `shardrun run`."""
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": 1}, run={"max_steps": 200, "log_every": 1},
        checkpoint={"every_steps": 1000}))
    proc = subprocess.Popen([sys.executable, "-m", "shardrun", "train", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=child_env(SHARDRUN_STEP_DELAY="0.2"))
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "step      3/200" in line:
                os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    text = "".join(out)
    assert proc.returncode == 130 and "stop requested (SIGINT)" in text, text[-4000:]
    stopped = int(re.search(r"stop requested: checkpoint of step (\d+) written", text)[1])
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    assert summary["stopped"] == "SIGINT" and summary["final_step"] == stopped and not summary["finished"]
    assert (tmp_path / "runs/tiny/checkpoints/latest").read_text() == f"step_{stopped:08d}"
