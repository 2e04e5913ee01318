"""The experiment trackers shardrun.driver.tracking feeds: MLflow, TensorBoard event files, Weights & Biases. Each
imports its client when it opens (an optional extra), and is made by `trackers(spec)` for the spec's tracking
section; `check(spec)` runs before Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable

from shardrun import fs
from shardrun.config import JobSpec
from shardrun.errors import UserError, redact

EXTRAS = {"mlflow": ("mlflow", "mlflow"), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
"""tracking.<key>: (the module it needs, the shardrun extra that installs it)."""
MLFLOW_TIMEOUT_S = "10"
"""MLflow's HTTP timeout for shardrun's calls (its own default is 120 s with 7 retries: minutes per call to a server
that stopped answering, spent on the tracker's thread but then at the end of the run)."""


class TensorBoard:
    """Event files under a folder (`tensorboard --logdir`): each metric a scalar under its metrics.jsonl name, at
    the training step; the resolved spec, the run's tags and its restarts as text. Every invocation of the run adds
    an event file to the folder, which TensorBoard reads as one run. A folder behind a URI (abfs://, s3://) gets
    the event files written on the driver's disk, uploaded whole every UPLOAD_EVERY_S, at each event and at the end
    (object stores have no append)."""

    name = "tensorboard"
    UPLOAD_EVERY_S = 60.0

    def __init__(self, folder: str):
        self.folder = folder
        self.writer = self.staging = None
        self._uploaded = 0.0

    def open(self, run_id: str | None) -> None:
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        if fs.is_uri(self.folder):
            self.staging = tempfile.mkdtemp(prefix="shardrun-tensorboard-")
        else:
            os.makedirs(self.folder, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.staging or self.folder, flush_secs=10)
        return None

    def where(self) -> str:
        if self.staging:
            return f"TensorBoard event files uploaded to {redact(self.folder)}"
        return f"TensorBoard event files in {self.folder} (tensorboard --logdir {self.folder})"

    def params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("spec", f"| key | value |\n| --- | --- |\n{rows}")

    def tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", json.dumps(tags, indent=2))

    def metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        import time

        for step, values in rows:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.staging and time.monotonic() - self._uploaded > self.UPLOAD_EVERY_S:
            self.writer.flush()
            self._upload()

    def event(self, step: int, text: str) -> None:
        self.writer.add_text("events", text, step)
        self.writer.flush()
        self._upload()

    def artifact(self, path: str) -> None:
        """TensorBoard keeps no files: a JSON file's content is text, others are left out."""
        if path.endswith(".json"):
            with open(path) as f:
                self.writer.add_text(os.path.basename(path), f"```\n{f.read()}\n```")

    def close(self, state: str) -> None:
        import shutil

        self.writer.add_text("events", f"the run {state}")
        self.writer.close()
        if self.staging:
            self._upload()
            shutil.rmtree(self.staging, ignore_errors=True)

    def _upload(self) -> None:
        """The staged event files, each whole, to the folder's URI (this invocation's file replaced)."""
        import time

        if not self.staging:
            return
        self._uploaded = time.monotonic()
        for name in sorted(os.listdir(self.staging)):
            with open(os.path.join(self.staging, name), "rb") as f:
                fs.write_bytes(fs.join(self.folder, name), f.read())


class MLflow:
    """An MLflow run: metrics at the training step (log_batch), the spec as parameters, the tags, events as tags
    `event.<step>`, summary.json as an artifact. Its id is the one kept in tracking.json: every invocation continues
    it. MLflow's parameters cannot change; a resumed run's changed ones go in as tags `param_changed.<key>`."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str]):
        self.uri, self.experiment, self.run_name, self.own_tags = uri, experiment, run_name, tags
        self.client = self.run_id = self.experiment_id = None

    def open(self, run_id: str | None) -> str:
        mlflow_env()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id, self.experiment_id = run_id, self.client.get_run(run_id).info.experiment_id
            return run_id
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                             tags=self.own_tags).info.run_id
        return self.run_id

    def where(self) -> str:
        if self.uri.startswith(("http://", "https://")):  # the server's own page of the run
            return (f"MLflow run {self.run_name}: {redact(self.uri.rstrip('/'))}/#/experiments/{self.experiment_id}"
                    f"/runs/{self.run_id}")
        return f"MLflow run {self.run_name} ({self.run_id}, experiment {self.experiment}) at {redact(self.uri)}"

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"param_changed.{k}", v[:5000]) for k, v in params.items() if k in logged and logged[k] != v]
        for i in range(0, len(new), 100):  # MLflow takes 100 parameters a batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1,000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def event(self, step: int, text: str) -> None:
        self.client.set_tag(self.run_id, f"event.{step:08d}", text[:5000])

    def artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def attach(self, run_id: str, path: str, name: str) -> str:
        """A file or folder made after the run (a report, an export) into its run's artifacts under name; where it
        is, for the line that says so."""
        mlflow_env()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        run = client.get_run(run_id)  # a run id the server does not know fails here, not half way through the files
        self.client, self.run_id, self.experiment_id = client, run_id, run.info.experiment_id
        self.run_name = run.info.run_name
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path=name)
        else:
            client.log_artifact(run_id, path, artifact_path=name)
        return f"{self.where()} (artifacts {name}/)"

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if state == "succeeded" else
                                   "KILLED" if state == "stopped" else "FAILED")


def mlflow_env() -> None:
    """MLflow's HTTP calls from this process fail within seconds (unless the environment says otherwise), its
    client prints no links of its own (shardrun's `tracking:` line gives the run's) and sends MLflow's makers no
    usage telemetry (MLFLOW_DISABLE_TELEMETRY=false in the environment lets it)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def mlflow_uri(spec: JobSpec) -> str | None:
    """The tracking URI MLflow logging goes to: tracking.mlflow's, else MLFLOW_TRACKING_URI (which alone turns it
    on); None: off (`tracking_uri: none` keeps it off where the environment has one)."""
    section = spec.tracking.mlflow
    uri = section.tracking_uri if section is not None and section.tracking_uri else os.environ.get(
        "MLFLOW_TRACKING_URI")
    return None if not uri or uri.lower() == "none" else uri


class WandB:
    """A Weights & Biases run: metrics at the training step, the spec as its config, the tags in its config under
    `shardrun`, events as an `event` text logged with the next step, summary.json as a file. Its id is the one kept
    in tracking.json, so every invocation continues it (resume="allow")."""

    name = "wandb"

    def __init__(self, spec, run_name: str, folder: str | None):
        self.spec, self.run_name, self.folder = spec, run_name, folder
        self.run = None

    def open(self, run_id: str | None) -> str:
        import wandb

        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
        self.run = wandb.init(project=self.spec.project, entity=self.spec.entity, mode=self.spec.mode,
                              name=self.run_name, id=run_id, resume="allow", dir=self.folder,
                              settings=wandb.Settings(silent=True, console="off"))
        return self.run.id

    def where(self) -> str:
        if self.spec.mode == "online":
            return f"W&B run {self.run_name}: {self.run.url}"
        folder = os.path.dirname(self.run.dir.rstrip("/"))  # the offline run's folder (its files/ is run.dir)
        return f"W&B {self.spec.mode} run {self.run.id} in {folder}" + (
            f" (`wandb sync {folder}` uploads it)" if self.spec.mode == "offline" else "")

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def tags(self, tags: dict[str, str]) -> None:
        self.run.config.update({"shardrun": tags}, allow_val_change=True)

    def metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            self.run.log(values, step=step)

    def event(self, step: int, text: str) -> None:
        self.run.log({"event": text}, commit=False)  # W&B's steps only go forward: with the next step's row

    def artifact(self, path: str) -> None:
        """Into the run's files folder, which W&B uploads at the end (wandb.save would link it, and warn)."""
        import shutil

        shutil.copyfile(path, os.path.join(self.run.dir, os.path.basename(path)))

    def attach(self, run_id: str, path: str, name: str) -> str:
        """A file or folder made after the run (a report, an export) as a W&B artifact of its run (continued for it),
        of type `model` (an export) or `report`."""
        import wandb

        self.open(run_id)
        try:
            kind = "model" if name.startswith("exports/") else "report"
            artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.run_name}-{name}"), type=kind)
            if os.path.isdir(path):
                artifact.add_dir(path)
            else:
                artifact.add_file(path)
            self.run.log_artifact(artifact)
        finally:
            self.run.finish()
        return f"W&B run {run_id} ({self.spec.mode}), artifact {artifact.name}"

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "succeeded" else 1)


def tensorboard_folder(spec: JobSpec) -> str:
    """Where TensorBoard's event files go: tracking.tensorboard.dir, else <run dir>/tensorboard (either may be a
    URI)."""
    tb = spec.tracking.tensorboard
    return os.path.expanduser(tb.dir) if tb is not None and tb.dir else fs.join(spec.run_dir, "tensorboard")


def trackers(spec: JobSpec) -> list:
    """The trackers the spec's tracking section asks for."""
    out = []
    uri = mlflow_uri(spec)
    if uri is not None:
        section = spec.tracking.mlflow
        experiment = (section and section.experiment) or spec.name
        out.append(MLflow(uri, experiment, (section and section.run_name) or spec.name,
                          dict(section.tags) if section else {}))
    tb = spec.tracking.tensorboard
    if tb is not None:
        out.append(TensorBoard(tensorboard_folder(spec)))
    if spec.tracking.wandb is not None:  # its files in the run dir, where it is local
        out.append(WandB(spec.tracking.wandb, spec.name, None if "://" in spec.run_dir else spec.run_dir))
    return out


def attach(run_dir: str, path: str, name: str, emit: Callable[[str], None]) -> None:
    """A report or an export of the run at run_dir (a local file or folder) into the runs its trackers kept in
    tracking.json, under name (`report`, `exports/<folder>`), each said in a line. Best effort: a tracker that fails
    is said and the command still succeeds (the files are where they were written); TensorBoard keeps no files."""
    from shardrun.config import parse
    from shardrun.driver.tracking import describe, kept_runs
    from shardrun.export import job_yaml

    kept = kept_runs(run_dir)
    if not kept:
        return
    if fs.is_uri(path):
        emit(f"tracking: {name} is at a URI ({redact(path)}); it is not uploaded to the run's trackers")
        return
    try:
        spec = parse(*job_yaml(run_dir))
    except UserError as e:  # the report or export is written: it stays, said
        emit(f"tracking: {name} is not uploaded to the run's trackers ({e})")
        return
    chosen = {t.name: t for t in trackers(spec) if hasattr(t, "attach")}
    for key, entry in kept.items():
        run_id, tracker = entry.get("run_id"), chosen.get(key)
        if run_id is None or key not in EXTRAS or key == "tensorboard":
            continue
        if tracker is None:  # MLflow's URI came from the run's environment and is not set here
            emit(f"tracking: {name} is not uploaded to the run's {key} run {run_id}: this shell has no tracking URI "
                 "for it (set MLFLOW_TRACKING_URI as the run had it)")
            continue
        try:
            emit(f"tracking: {name} is in {tracker.attach(run_id, path, name)}")
        except Exception as e:  # noqa: BLE001 - a tracker's client raises anything; the files are written
            emit(f"tracking: {name} did not reach {tracker.name} ({describe(e)}); it is at {redact(path)}")


def check(spec: JobSpec) -> None:
    """Before Ray: each tracker the spec asks for has its client installed, an MLflow server that answers, a
    TensorBoard URI that opens, and (W&B online) a key (UserError)."""
    uri = mlflow_uri(spec)
    for key, (module, extra) in EXTRAS.items():
        wanted = uri is not None if key == "mlflow" else getattr(spec.tracking, key) is not None
        if wanted and importlib.util.find_spec(module) is None:
            where = "" if spec.tracking.mlflow is not None or key != "mlflow" else " (MLFLOW_TRACKING_URI is set)"
            raise UserError(f"tracking.{key}{where} needs the {module} package: pip install 'shardrun[{extra}]'")
    if uri is not None and uri.startswith(("http://", "https://")):
        check_mlflow(uri)
    tb = spec.tracking.tensorboard
    folder = tensorboard_folder(spec)
    if tb is not None and fs.is_uri(folder):
        try:
            fs.filesystem(folder)
        except UserError as e:
            raise UserError(f"tracking.tensorboard{'.dir' if tb.dir else ' (in the run dir)'}: {e}") from None
    wb = spec.tracking.wandb
    if wb is not None and wb.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")):
        raise UserError("tracking.wandb mode online needs W&B's key on this machine: set WANDB_API_KEY or run `wandb "
                        "login`; or set tracking.wandb.mode: offline (files in the run dir, `wandb sync` later)")


def check_mlflow(uri: str) -> None:
    """An MLflow server that answers at uri (one request, seconds); UserError naming the URI otherwise."""
    mlflow_env()
    from mlflow.tracking import MlflowClient

    from shardrun.driver.tracking import describe

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - requests', MLflow's and the server's errors alike
        raise UserError(f"tracking.mlflow.tracking_uri {redact(uri)}: no MLflow server answers there "
                        f"({describe(e)})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _netrc_has(host: str) -> bool:
    """Whether ~/.netrc (where `wandb login` keeps the key) has an entry for host."""
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
