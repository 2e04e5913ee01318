"""Launch a job on Ray Train V2: TorchTrainer over the spec's workers, progress, summary.json."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardrun import checkpoint_format as layout
from shardrun import fs
from shardrun.cluster.connect import connect
from shardrun.cluster.events import EventChannel, EventForwarder
from shardrun.cluster.failures import deterministic_error, deterministic_errors_not_retried, worker_errors
from shardrun.cluster.worker import train_fn
from shardrun.config import JobSpec
from shardrun.driver.observer import RunObserver
from shardrun.driver.run_dir import prepare_run_dir
from shardrun.driver.run_log import carry_over
from shardrun.driver.stop_signals import StopSignals
from shardrun.errors import redact
from shardrun.metrics import bind_host
from shardrun.trainer.azure_events import WAIT_MARGIN_S


def scaling_config(spec: JobSpec) -> ScalingConfig:
    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ScalingConfig(
        num_workers=s.num_workers,  # (min, max): Ray Train's elastic worker group
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.resize_check_seconds,
    )


def run_config(spec: JobSpec) -> RunConfig:
    """Checkpoints under checkpoint.storage/<name>: a path, or a URI opened by pyarrow as shardrun opens
    it (abfs://, s3://), so that Ray Train uploads to and downloads from the same place."""
    storage, path = fs.filesystem(spec.checkpoint.storage)
    return RunConfig(
        name=spec.name,
        storage_path=path,
        storage_filesystem=storage if fs.is_uri(spec.checkpoint.storage) else None,
        failure_config=FailureConfig(
            max_failures=spec.failure.max_failures, max_preemption_failures=spec.failure.max_preemptions,
            # The ranks end the group themselves once a drained node is gone, or WAIT_MARGIN_S
            # after the event's NotBefore (at most 15 minutes away): Ray Train's own limit, counted from the
            # drain's deadline (now), must not come first.
            preemption_grace_s=15 * 60 + WAIT_MARGIN_S + 60),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep, **(
            {"checkpoint_score_attribute": "eval_loss", "checkpoint_score_order": "min"}
            if spec.checkpoint.keep_best else {})),
    )


def launch(spec: JobSpec, *, fresh: bool = False, emit: Callable[[str], None] = print,
           data_index: dict | None = None, started: float | None = None) -> dict:
    """Train spec on Ray to run.max_steps (resuming the run of the same name); returns the summary.

    data_index: the run's data index (datasets.build_index(...).to_dict()), read once here for every
    worker and every restart; None lets each worker read the file footers itself.
    started: time.time() when the caller began connecting to Ray (the summary's wall_seconds count from it).
    """
    t0 = started or time.time()
    emit(f"connecting to {connect()}")
    spec.metrics.host = bind_host(spec.metrics.host, cluster=bool(os.environ.get("RAY_ADDRESS")))
    prepare_run_dir(spec, fresh=fresh, emit=emit)
    set_aside_unreadable_snapshot(spec.run_dir, emit)
    # on the driver's node, as Ray Train's controller is: a worker node that dies must not take it along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = EventChannel.options(scheduling_strategy=here).remote(spec.run.max_steps, spec.model.byte_level,
                                                                  spec.failure.same_failure_limit)
    observer = RunObserver(spec, emit)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"spec": spec.model_dump(mode="json"), "events": actor, "run_dir": spec.run_dir,
                           "data_index": data_index},
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(spec),
        run_config=run_config(spec),
    )
    latest, error = None, None
    stops = StopSignals(lambda reason: actor.request_stop.remote(reason), emit)
    try:
        with stops, EventForwarder(actor, observer), deterministic_errors_not_retried():
            result = fit_beside_the_main_thread(trainer)
        latest = result.checkpoint.path if result.checkpoint else None
    except BaseException as e:
        error = deterministic_error(e)
        if error is not None:  # the worker's own message, not Ray Train's wrapping of it
            raise error from None
        said = worker_errors(e)  # each rank's error in a line, not Ray Train's tracebacks (--debug has them)
        error = RuntimeError(f"the workers failed: {said}") if said else e
        if error is not e:
            raise error from e
        raise
    finally:
        summary = ray.get(actor.summary.remote(latest, time.time() - t0))
        state = "failed" if error is not None else "stopped" if summary.get("stopped") else "succeeded"
        if isinstance(error, KeyboardInterrupt):
            summary["error"] = "interrupted: stopped at once by a second signal, without a checkpoint"
        elif error is not None:
            summary["error"] = redact(f"{type(error).__name__}: {error}")
        path = fs.join(spec.run_dir, "summary.json")
        try:
            summary = carry_over(summary, fs.read_json(path))
            fs.write_json(path, summary)
        finally:
            observer.close(state)  # after summary.json: the trackers get this invocation's
    return summary


def set_aside_unreadable_snapshot(run_dir: str, emit: Callable[[str], None]) -> None:
    """Ray Train writes its record of a run's checkpoints in place: a crash or a full disk at that moment
    leaves it empty or cut off, and Ray Train then refuses to start the run. Such a record is moved aside; the
    workers resume from the newest complete checkpoint in storage instead (RayCheckpointStore)."""
    path = fs.join(run_dir, layout.RAY_SNAPSHOT)
    text = fs.read_text(path)
    if text is None:
        return
    try:
        json.loads(text)
        return
    except ValueError as e:
        why = f"{e}" if text.strip() else "it is empty"
    aside = fs.move_aside(path, "unreadable", advice="delete it; the run then resumes from the newest complete "
                          "checkpoint in storage")
    emit(f"Ray's record of this run's checkpoints ({layout.RAY_SNAPSHOT}) was unreadable ({why}); moved it to "
         f"{redact(aside)}: the run resumes from the newest complete checkpoint in storage")


def fit_beside_the_main_thread(trainer: TorchTrainer):
    """trainer.fit() in a thread, the main thread waiting: signals reach StopSignals' handlers there (Ray
    Train's fit, in the main thread, puts its own SIGINT handler in, which aborts the run without a
    checkpoint)."""
    done: dict = {}

    def fit() -> None:
        try:
            done["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            done["error"] = e

    thread = threading.Thread(target=fit, name="shardrun-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in done:
        raise done["error"]
    return done["result"]
