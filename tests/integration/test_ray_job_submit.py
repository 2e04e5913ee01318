"""`ray job submit` of the default job to a local `ray start --head` with token authentication on."""

import secrets
import subprocess
import time

import pytest
from helpers import BIN, REPO, child_env, free_port, kill_group, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(500)]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token auth; yields (dashboard address, env with the token)."""
    env = child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    dashboard = f"http://127.0.0.1:{(dash_port := free_port())}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
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


def test_default_job_succeeds_under_ray_job_submit(tmp_path, ray_head):
    dashboard, env = ray_head
    wrong = dict(env, RAY_AUTH_TOKEN="not-the-token")
    refused = run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=wrong,
                  timeout=60, check=False)
    assert refused.returncode != 0, "the head accepted a wrong token"

    job_id = f"shardrun-test-{secrets.token_hex(4)}"
    submit = run([
        str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id,
        "--working-dir", str(REPO), "--",
        "shardrun", "run", "examples/gpt-stdlib.yaml",
        "--set", "run.max_steps=20", "--set", "run.log_every=10",
        "--set", f"checkpoint.storage={tmp_path / 'runs'}",
        "--set", f"data.paths=[{tmp_path / 'data'}]", "--set", "data.prepare.max_mb=1",
    ], env=env, timeout=420, check=False)
    assert submit.returncode == 0, submit.stdout[-6000:]
    assert "step     20/20" in submit.stdout
    status = run([str(BIN / "python"), "-c",
                  "import sys; from ray.job_submission import JobSubmissionClient as C; "
                  "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", dashboard, job_id],
                 env=env, timeout=60)
    assert status.stdout.strip().splitlines()[-1] == "SUCCEEDED"
    assert (tmp_path / "runs" / "gpt-stdlib" / "summary.json").exists()
