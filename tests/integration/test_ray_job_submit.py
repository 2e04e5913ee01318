"""`shardrun submit | status | logs | stop` against a local `ray start --head` with token authentication on:
the default job runs to the end; a stopped job checkpoints first (the runtime env raises Ray's stop grace)."""

import json
import secrets
import subprocess
import time

import pytest
from helpers import BIN, REPO, child_env, free_port, kill_group, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(500)]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token auth; yields (dashboard address, env with the token)."""
    env = child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), SHARDRUN_STEP_DELAY="0.05")
    dashboard = f"http://127.0.0.1:{(dash_port := free_port())}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--disable-usage-stats"],
        # (no drain on SIGTERM: with jobs run, the node would wait out the drain's 30 s at teardown)
        env=dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"), stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            probe = run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=env,
                        timeout=60, check=False)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Ray head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:])
            time.sleep(2)
        yield dashboard, env
    finally:
        kill_group(head, grace=30)  # `ray start --block` stops its node's processes on SIGTERM
        head.wait(timeout=30)


def shardrun(*args, env, timeout=420, check=False):
    return run([str(BIN / "shardrun"), *args], env=env, timeout=timeout, check=check, cwd=REPO)


def test_submit_follows_the_default_job_to_success_and_stop_checkpoints_first(tmp_path, ray_head):
    dashboard, env = ray_head
    refused = shardrun("status", "gpt-stdlib", "--address", dashboard, env=dict(env, RAY_AUTH_TOKEN="not-the-token"))
    assert refused.returncode == 2 and "refused this client's token" in refused.stdout, refused.stdout

    common = ["--address", dashboard, "--set", f"checkpoint.storage={tmp_path / 'runs'}",
              "--set", f"data.paths=[{tmp_path / 'data'}]", "--set", "data.prepare.max_mb=1",
              "--set", "failure.scheduled_events=off"]
    # a value that looks like a secret: every --set value reaches the job in a file, off its command line
    targets = tmp_path / "targets" / "token=abc"
    done = shardrun("submit", "examples/gpt-stdlib.yaml", *common, "--set", "run.max_steps=10",
                    "--set", "run.log_every=5", "--set", f"metrics.targets_dir={targets}", env=env)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "gpt-stdlib.yaml --overrides-from shardrun_overrides_" in done.stdout and targets.is_dir(), done.stdout
    assert "step     10/10" in done.stdout and "SUCCEEDED" in done.stdout
    assert (tmp_path / "runs" / "gpt-stdlib" / "summary.json").exists()
    assert "SUCCEEDED" in shardrun("status", "gpt-stdlib", "--address", dashboard, env=env, check=True).stdout

    # a long job, stopped while it runs: `ray job stop` underneath, SIGTERM to the driver
    queued = shardrun("submit", "examples/gpt-stdlib.yaml", *common, "--set", "run.max_steps=5000",
                      "--set", "run.log_every=1", "--set", "checkpoint.every_steps=5000", "--no-wait", env=env,
                      check=True)
    assert "submitted gpt-stdlib-" in queued.stdout
    metrics = tmp_path / "runs" / "gpt-stdlib" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not any(json.loads(row)["step"] >= 30 for row in metrics.read_text().splitlines()):
        assert time.monotonic() < deadline, "the second job did not reach step 30"
        time.sleep(1)
    assert "step     30/5000" in shardrun("logs", "gpt-stdlib", "--address", dashboard, env=env).stdout
    # while it runs, a second submit of the name is refused, the job named; so is a run beside it on the head
    again = shardrun("submit", "examples/gpt-stdlib.yaml", *common, "--no-wait", env=env)
    job = queued.stdout.split("submitted ", 1)[1].split()[0]
    assert again.returncode == 2 and f"already on this cluster: job {job}, RUNNING" in again.stdout, again.stdout
    beside = shardrun("run", "examples/gpt-stdlib.yaml", *common[2:], env=env)
    assert beside.returncode == 2 and "is in use by `shardrun run`" in beside.stdout, beside.stdout
    assert f"Ray job {job}" in beside.stdout and f"shardrun stop {job}" in beside.stdout
    assert "running (" in shardrun("runs", str(tmp_path / "runs"), env=env).stdout
    stopped = shardrun("stop", "gpt-stdlib", "--address", dashboard, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith("STOPPED"), stopped.stdout
    summary = json.loads((tmp_path / "runs" / "gpt-stdlib" / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["final_step"] >= 30, summary
    last = tmp_path / "runs" / "gpt-stdlib" / f"checkpoint_{summary['final_step']:08d}"
    assert (last / "shardrun.json").exists() and (last / "commit.json").exists()  # committed, and marked so
