"""`shardrun run` on a local Ray instance (Ray Train V2 + DeepSpeed): train, checkpoint, lose a worker, resume by
name (even when Ray's record of the checkpoints is lost), as one run in MLflow and TensorBoard."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
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


def test_same_name_twice_resumes_where_the_first_stopped_and_lands_as_one_tracked_run(
        tmp_path, corpus, stale_ray_address, mlflow_server, capsys):
    """The first run loses a worker (SIGKILL) and restarts; the second, by the same name, resumes where it ended.
    MLflow and TensorBoard hold one run of both, each log step once; the report and an export join it after."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator

    from shardrun.cli import main
    from shardrun.driver.tracking import flatten

    path = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", run={"max_steps": 20, "log_every": 10},
        checkpoint={"every_steps": 10, "keep": 1}, failure={"max_failures": 1},
        tracking={"mlflow": {"tracking_uri": mlflow_server.uri, "experiment": "ray-tests"}, "tensorboard": {}}))
    run_dir = tmp_path / "runs" / "tiny"
    killed = {**stale_ray_address, "SHARDRUN_FAULT": "kill:step=15:rank=1",
              "SHARDRUN_FAULT_MARKER": str(tmp_path / "killed")}

    out = run([sys.executable, "-m", "shardrun", "run", str(path)], timeout=240, env=killed).stdout
    assert "starting with 2 workers" in out and "step     20/20" in out
    assert "resuming from step 10 with 2 workers (restart 1)" in out, out[-4000:]
    # Ray Train's placement group cleaner asked this instance, not the address file's (it waited 12 s then)
    assert "PlacementGroupCleaner" not in out and "Monitor thread did not exit" not in out, out[-4000:]
    assert "metrics: 2 ranks and the run's own series (state, workers, restarts) at 127.0.0.1:" in out
    tracked = [line for line in out.splitlines() if "tracking:" in line]  # where; nothing lost, nothing failed
    assert len(tracked) == 2 and f"tracking: MLflow run tiny: {mlflow_server.uri}/#/experiments/1/runs/" in out \
        and f"tracking: TensorBoard event files in {run_dir / 'tensorboard'} (tensorboard --logdir" in out, tracked
    assert "View run" not in out  # MLflow's own links, printed to stdout, are kept off
    first = json.loads((run_dir / "summary.json").read_text())
    assert (first["start_step"], first["final_step"], first["restarts"]) == (0, 20, 1)
    assert first["last_loss"] < first["first_loss"]
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
    assert "tracking: continuing MLflow run tiny: " in out, out[-4000:]
    second = json.loads((run_dir / "summary.json").read_text())
    assert (second["start_step"], second["final_step"], second["steps"]) == (20, 40, 20)
    assert second["tokens"] == 20 * 2 * 4 * 32
    assert second["checkpoint"].endswith("checkpoint_00000040")
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000040"]  # Ray prunes only what its new record holds
    # the driver kept the per-log-step record across both runs (and the restart's first step) and took its
    # targets out at the end
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == [1, 10, 11, 20, 21, 30, 40]
    tracked_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert not list((tmp_path / "runs" / "targets").glob("*.json"))

    # the report and an export made afterwards join the tracked run (the commands in this process: no Ray here)
    assert main(["report", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    out = capsys.readouterr().out
    page = f"{mlflow_server.uri}/#/experiments/1/runs/{tracked_id}"
    assert f"tracking: report is in MLflow run tiny: {page} (artifacts report/)" in out, out
    assert f"tracking: exports/exported is in MLflow run tiny: {page} (artifacts exports/exported/)" in out, out

    client = MlflowClient(mlflow_server.uri)
    [tracked] = client.search_runs([client.get_experiment_by_name("ray-tests").experiment_id])
    assert tracked.info.run_name == "tiny" and tracked.info.status == "FINISHED"
    assert tracked.info.run_id == tracked_id
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in records]
    resolved = flatten(yaml.safe_load((run_dir / "job.yaml").read_text()))  # the second run's spec
    assert tracked.data.params == {**resolved, "run.max_steps": "20"}
    assert tracked.data.tags["param_changed.run.max_steps"] == "40"
    assert {"version.torch", "version.deepspeed", "version.ray", "version.cuda"} <= tracked.data.tags.keys()
    assert any("restart 1" in v for k, v in tracked.data.tags.items() if k.startswith("event."))
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert artifacts == {"summary.json", "report", "exports"}, artifacts
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "exports/exported")} == {
        "exports/exported/config.json", "exports/exported/model.safetensors"}
    assert "report/report.html" in {a.path for a in client.list_artifacts(tracked.info.run_id, "report")}

    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                                size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in records]
