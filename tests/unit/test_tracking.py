"""Experiment tracking from the driver: a tracker that stops answering or fails never holds training up (records
are queued, dropped past the queue, and what did not reach it is said at the end); one tracked run across
invocations, whose steps are never sent twice; TensorBoard's event files, read back with TensorBoard's own reader."""

import json
import re
import threading

import pyarrow.fs as pafs
import pytest
from helpers import tiny_spec

from shardrun.config import parse
from shardrun.driver import trackers
from shardrun.driver.tracking import RECORD_FILE, Tracking, flatten, metric_values
from shardrun.errors import UserError

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A tracker that keeps what it is sent; `answer` unset: it stops answering (every call waits for it)."""

    def __init__(self, name="recorder", *, fail: Exception | None = None):
        self.name, self.fail = name, fail
        self.answer = threading.Event()
        self.answer.set()
        self.sent: list[tuple] = []
        self.opened_with = "never"
        self.calls = 0

    def _call(self, *what):
        self.answer.wait()
        if self.fail is not None and what[0] == "metrics":
            raise self.fail
        self.sent.append(what)

    def open(self, run_id):
        self.opened_with = run_id
        return run_id or "run-1"

    def where(self):
        return f"{self.name}'s run"

    def params(self, params):
        self._call("params", params)

    def tags(self, tags):
        self._call("tags", tags)

    def metrics(self, rows):
        self.calls += 1
        for step, values in rows:
            self._call("metrics", step, values)

    def event(self, step, text):
        self._call("event", step, text)

    def artifact(self, path):
        self._call("artifact", path)

    def close(self, state):
        self._call("close", state)


def test_records_go_to_the_trackers_with_their_step_and_a_resumed_run_continues_without_sending_a_step_twice(
        tmp_path):
    lines = []
    first = Recorder()
    tracking = Tracking([first], str(tmp_path), lines.append)
    tracking.start({"deepspeed.zero_stage": "2"}, {"shardrun.run": "tiny"})
    tracking.event(0, "starting with 2 workers")
    for step in range(1, 5):
        tracking.record({"time": 1.0, "step": step, "tokens": 64 * step, "loss": 5.0 - step / 10, "mfu": None})
    tracking.close("stopped")
    assert first.opened_with is None and ("params", {"deepspeed.zero_stage": "2"}) in first.sent
    assert [s[1] for s in first.sent if s[0] == "metrics"] == [1, 2, 3, 4]
    assert ("metrics", 4, {"loss": 4.6}) in first.sent  # metrics.jsonl's names; no bookkeeping, no None
    assert json.loads((tmp_path / RECORD_FILE).read_text())["recorder"]["run_id"] == "run-1"
    assert lines == ["tracking: recorder's run"]  # where it is, and nothing else to say

    second = Recorder()  # resumed from the checkpoint of step 2: steps 3 and 4 are trained again
    tracking = Tracking([second], str(tmp_path), lines.append)
    tracking.start({}, {})
    tracking.event(2, "resuming from step 2 with 2 workers")
    for step in range(3, 7):
        tracking.record({"step": step, "loss": 1.0})
    tracking.close("succeeded")
    assert second.opened_with == "run-1"  # the same tracked run
    assert [s[1] for s in second.sent if s[0] == "metrics"] == [5, 6]
    assert ("event", 2, "resuming from step 2 with 2 workers") in second.sent
    assert json.loads((tmp_path / RECORD_FILE).read_text())["recorder"]["last_step"] == 6
    assert lines[1:] == ["tracking: continuing recorder's run"]


def test_records_that_come_while_a_tracker_is_busy_go_in_one_call_each_step_once(tmp_path):
    busy = Recorder()
    busy.answer.clear()  # held up in sending the run's parameters
    tracking = Tracking([busy], str(tmp_path), lambda line: None)
    tracking.start({"a": "1"}, {})
    for step in (1, 2, 3, 2, 3, 4):  # a restart from step 1's checkpoint trains 2 and 3 again
        tracking.record({"step": step, "loss": float(step)})
    busy.answer.set()
    tracking.close("succeeded")
    assert busy.calls == 1 and [s[1] for s in busy.sent if s[0] == "metrics"] == [1, 2, 3, 4]


def test_a_tracker_that_stops_answering_never_holds_the_run_up_and_what_it_missed_is_said(tmp_path):
    lines = []
    stuck, healthy = Recorder("stuck"), Recorder("healthy")
    tracking = Tracking([stuck, healthy], str(tmp_path), lines.append, queue_size=5)
    tracking.start({}, {})
    stuck.answer.clear()  # from here on every call to it waits
    for step in range(1, 101):  # each returns at once: the test would time out otherwise
        tracking.record({"step": step, "loss": 1.0})
    tracking.close("succeeded", timeout_s=1)
    said = [line for line in lines if "stuck is 5 records behind; its records are dropped until it catches up" in line]
    assert len(said) == 1 and "(training goes on)" in said[0], lines
    assert any(re.fullmatch(r"tracking: waiting up to 1 s for stuck to take \d+ records? more", line)
               for line in lines), lines
    # all of them: those dropped, those queued, and the one in flight, if any (its open's parameters hold it up)
    assert "tracking: 100 of the run's records did not reach stuck (it did not answer); metrics.jsonl in the run " \
           "dir has them all" in lines, lines
    assert ("close", "succeeded") in healthy.sent  # the other tracker was held up by none of it
    stuck.answer.set()


def test_a_tracker_that_fails_is_said_once_and_training_goes_on(tmp_path):
    lines = []
    failing = Recorder("mlflow", fail=ConnectionError("http://127.0.0.1:5000 refused the connection"))
    tracking = Tracking([failing], str(tmp_path), lines.append)
    tracking.start({}, {})
    for step in range(1, 4):
        tracking.record({"step": step, "loss": 1.0})
    tracking.close("succeeded")
    said = [line for line in lines if "failed (ConnectionError: http://127.0.0.1:5000 refused" in line]
    assert len(said) == 1 and "training goes on" in said[0], lines
    assert lines[-1].startswith("tracking: 3 of the run's records did not reach mlflow (ConnectionError: "), lines


def test_the_spec_becomes_dotted_parameters_with_secrets_masked():
    params = flatten({"deepspeed": {"zero_stage": 2, "optimizer": {"betas": [0.9, 0.95]}}, "eval": None,
                      "data": {"paths": ["abfs://c@a.dfs.core.windows.net/d?sig=SECRET"]}})
    assert params["deepspeed.zero_stage"] == "2" and params["deepspeed.optimizer.betas"] == "[0.9, 0.95]"
    assert params["eval"] == "null" and "SECRET" not in params["data.paths"]
    assert metric_values({"step": 3, "loss": 2.5, "eval_loss": float("nan"), "mfu": None, "ok": True}) == {"loss": 2.5}


def test_tensorboard_event_files_behind_a_uri_hold_each_metric_at_its_step_across_invocations(tmp_path, corpus,
                                                                                              s3_server):
    """Event files for a folder on an object store (here S3), written locally and uploaded; the folder in the run
    dir (the default) is read back by tests/integration/test_ray_run.py."""
    from tensorboard.backend.event_processing import event_accumulator

    from shardrun.driver.observer import RunObserver

    folder = s3_server.uri("tensorboard")
    spec = parse(tiny_spec(corpus, tmp_path / "runs", tracking={"tensorboard": {"dir": folder}},
                           metrics={"enabled": False}))
    trackers.check(spec)
    for steps, start in ((range(1, 5), 0), (range(3, 7), 2)):  # the second resumes from step 2's checkpoint
        observer = RunObserver(spec, lambda line: None, stream=open("/dev/null", "w"))
        observer.started({"step": start, "world_size": 2}, f"starting at step {start}")
        for step in steps:
            observer.record({"step": step, "loss": 10.0 - step, "lr": 1e-3}, "line")
        observer.close("succeeded")
    filesystem, bucket = s3_server.filesystem()
    uploaded = filesystem.get_file_info(pafs.FileSelector(f"{bucket}/tensorboard"))
    assert len(uploaded) == 2 and all(".tfevents." in f.base_name for f in uploaded), uploaded  # one a run
    for info in uploaded:
        with filesystem.open_input_stream(info.path) as f:
            (tmp_path / info.base_name).write_bytes(f.read())
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, 10.0 - s) for s in range(1, 7)]
    assert {"lr", "loss"} <= set(events.Tags()["scalars"])
    assert {"spec/text_summary", "tags/text_summary", "events/text_summary"} <= set(events.Tags()["tensors"])


def test_a_tracker_without_its_client_or_with_a_folder_it_cannot_write_exits_2(tmp_path, corpus, monkeypatch):
    spec = parse(tiny_spec(corpus, tmp_path, tracking={"tensorboard": {"dir": "nosuch://bucket/tb"}}))
    with pytest.raises(UserError, match="tracking.tensorboard.dir: nosuch://bucket/tb: cannot open this storage"):
        trackers.check(spec)
    monkeypatch.setitem(trackers.EXTRAS, "tensorboard", ("shardrun_no_such_module", "tensorboard"))
    with pytest.raises(UserError, match=r"tracking.tensorboard needs the shardrun_no_such_module package: pip install "
                                        r"'shardrun\[tensorboard\]'"):
        trackers.check(parse(tiny_spec(corpus, tmp_path, tracking={"tensorboard": {}})))


def wandb_records(run_dir) -> list:
    """Every record of the W&B offline runs under run_dir, oldest run first: their run files (`run-<id>.wandb`) read
    as W&B writes them (LevelDB's log format: 32 KiB blocks of records with a 7-byte header, after a 7-byte file
    header), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns):
        data, pos, block, pending = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block  # a block's tail too short for a header is padding
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += block - pos % block
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def test_wandb_offline_holds_one_run_with_each_step_once_across_invocations(tmp_path, corpus):
    from shardrun.driver.observer import RunObserver

    spec = parse(tiny_spec(corpus, tmp_path / "runs", metrics={"enabled": False},
                           tracking={"wandb": {"project": "shardrun-tests", "mode": "offline"}}))
    trackers.check(spec)  # offline needs no key
    for steps, start in ((range(1, 5), 0), (range(3, 7), 2)):  # the second resumes from step 2's checkpoint
        observer = RunObserver(spec, lambda line: None, stream=open("/dev/null", "w"))
        observer.started({"step": start, "world_size": 2}, f"starting at step {start}")
        for step in steps:
            observer.record({"step": step, "loss": 10.0 - step}, "line")
        observer.close("succeeded")
    runs = sorted((tmp_path / "runs/tiny/wandb").glob("offline-run-*"))
    ids = {f.stem for run in runs for f in run.glob("run-*.wandb")}
    assert len(runs) == 2 and len(ids) == 1, (runs, ids)  # one W&B run id, continued
    records = wandb_records(tmp_path / "runs/tiny")
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]
    assert [(row["_step"], row["loss"]) for row in rows if "loss" in row] == [(s, 10.0 - s) for s in range(1, 7)]
    config = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"deepspeed.zero_stage", "shardrun"} <= config

    # a report made afterwards joins the run as an artifact (`shardrun report` and `export` do this)
    (tmp_path / "runs/tiny/job.yaml").write_text(spec.to_yaml())
    (tmp_path / "report").mkdir()
    (tmp_path / "report/report.html").write_text("<html></html>")
    lines = []
    trackers.attach(str(tmp_path / "runs/tiny"), str(tmp_path / "report"), "report", lines.append)
    assert lines == [f"tracking: report is in W&B run {ids.pop().removeprefix('run-')} (offline), artifact "
                     "tiny-report"], lines
    [artifact] = [r.artifact for r in wandb_records(tmp_path / "runs/tiny") if r.WhichOneof("record_type") ==
                  "artifact"]
    assert (artifact.name, artifact.type) == ("tiny-report", "report")
    assert [f.path for f in artifact.manifest.contents] == ["report.html"]


def test_wandb_online_without_a_key_exits_2(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(UserError, match="tracking.wandb mode online needs W&B's key on this machine"):
        trackers.check(parse(tiny_spec(corpus, tmp_path, tracking={"wandb": {"project": "p"}})))


@pytest.mark.timeout(180)
def test_an_mlflow_server_that_stops_answering_costs_the_run_nothing_and_is_said(tmp_path, mlflow_server):
    lines = []
    tracker = trackers.MLflow(mlflow_server.uri, "tests", "tiny", {})
    tracking = Tracking([tracker], str(tmp_path), lines.append, queue_size=50)
    tracking.start({"a": "1"}, {})
    tracking.record({"step": 1, "loss": 1.0})
    mlflow_server.pause()  # from here on it takes connections and answers nothing
    for step in range(2, 201):  # each returns at once: the test would time out otherwise
        tracking.record({"step": step, "loss": 1.0})
    tracking.close("succeeded", timeout_s=3)
    assert sum("mlflow is 50 records behind" in line for line in lines) == 1, lines
    assert any(re.fullmatch(r"tracking: waiting up to 3 s for mlflow to take \d+ records more", line)
               for line in lines), lines
    # every record after the pause (step 1's too where it was not through before it)
    assert re.match(r"tracking: (199|200) of the run's records did not reach mlflow", lines[-1]), lines


def test_a_bad_mlflow_uri_exits_2_before_ray_and_the_environment_alone_turns_mlflow_on(tmp_path, corpus,
                                                                                          monkeypatch):
    from helpers import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"tracking.mlflow.tracking_uri {nobody}: no MLflow server answers there"):
        trackers.check(parse(tiny_spec(corpus, tmp_path, tracking={"mlflow": {"tracking_uri": nobody}})))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nobody)  # as Azure ML compute sets it
    plain = parse(tiny_spec(corpus, tmp_path))
    assert [t.name for t in trackers.trackers(plain)] == ["mlflow"]
    with pytest.raises(UserError, match="no MLflow server answers there"):
        trackers.check(plain)
    off = parse(tiny_spec(corpus, tmp_path, tracking={"mlflow": {"tracking_uri": "none"}}))
    assert trackers.trackers(off) == []


def test_a_report_for_a_tracked_run_that_cannot_be_uploaded_is_said_and_kept(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs/tiny"
    run_dir.mkdir(parents=True)
    (run_dir / RECORD_FILE).write_text(json.dumps({"mlflow": {"run_id": "abc", "last_step": 10}}))
    lines = []
    trackers.attach(str(run_dir), str(tmp_path), "report", lines.append)  # no job.yaml
    assert len(lines) == 1 and lines[0].startswith("tracking: report is not uploaded to the run's trackers (") \
        and "job.yaml is missing" in lines[0], lines
    # the run had MLflow's URI from its environment; this shell has none
    (run_dir / "job.yaml").write_text(parse(tiny_spec(corpus, tmp_path / "runs")).to_yaml())
    lines.clear()
    trackers.attach(str(run_dir), str(tmp_path), "report", lines.append)
    assert lines == ["tracking: report is not uploaded to the run's mlflow run abc: this shell has no tracking URI "
                     "for it (set MLFLOW_TRACKING_URI as the run had it)"], lines

