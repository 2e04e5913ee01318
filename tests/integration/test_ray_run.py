"""`shardrun run` on a local Ray instance (Ray Train V2 + DeepSpeed): train, checkpoint, resume by name (even
when Ray's record of the checkpoints is lost)."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import child_env, free_port, run, tiny_spec, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture
def stale_ray_address():
    """The environment of a machine where `ray start` ran once: Ray's address file (which only `ray start` writes)
    names a cluster that is gone. In a Ray temp root of the test's own (RAY_TMPDIR; short, for Ray's sockets)."""
    root = Path(tempfile.mkdtemp(prefix="sr-"))
    try:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        yield child_env(RAY_TMPDIR=str(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_same_name_twice_resumes_where_the_first_stopped(tmp_path, corpus, stale_ray_address):
    path = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", run={"max_steps": 20, "log_every": 10},
        checkpoint={"every_steps": 10, "keep": 1}))
    run_dir = tmp_path / "runs" / "tiny"

    out = run([sys.executable, "-m", "shardrun", "run", str(path)], timeout=180, env=stale_ray_address).stdout
    assert "starting with 2 workers" in out and "step     20/20" in out
    # Ray Train's placement group cleaner asked this instance, not the address file's (it waited 12 s then)
    assert "PlacementGroupCleaner" not in out and "Monitor thread did not exit" not in out, out[-4000:]
    assert "metrics: 2 ranks and the run's own series (state, workers, restarts) at 127.0.0.1:" in out
    first = json.loads((run_dir / "summary.json").read_text())
    assert (first["start_step"], first["steps"], first["restarts"]) == (0, 20, 0)
    assert first["last_loss"] < first["first_loss"]
    assert first["tokens"] == 20 * 2 * 4 * 32
    assert (run_dir / "job.yaml").exists()

    # Ray writes its record of the checkpoints in place: a crash or a full disk then leaves it empty, and Ray
    # Train would refuse to start; the run resumes from the newest complete checkpoint in storage instead
    (run_dir / "checkpoint_manager_snapshot.json").write_text("")
    out = run([sys.executable, "-m", "shardrun", "run", str(path), "--set", "run.max_steps=40"],
              timeout=180, env=stale_ray_address).stdout
    assert "(checkpoint_manager_snapshot.json) was unreadable (it is empty); moved it to " in out, out[-4000:]
    assert "Ray's record of this run's checkpoints names no checkpoint; resuming from the newest complete " \
           f"checkpoint in storage, {run_dir / 'checkpoint_00000020'}" in out, out[-4000:]
    assert "resuming from step 20 with 2 workers" in out
    second = json.loads((run_dir / "summary.json").read_text())
    assert (second["start_step"], second["final_step"], second["steps"]) == (20, 40, 20)
    assert second["checkpoint"].endswith("checkpoint_00000040")
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000040"]  # Ray prunes only what its new record holds
    # the driver kept the per-log-step record across both runs and took its targets out at the end
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 10, 20, 21, 30, 40]
    assert not list((tmp_path / "runs" / "targets").glob("*.json"))
