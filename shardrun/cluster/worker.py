"""What runs on each Ray Train worker: the worker loop, with Ray behind its session (checkpoints through Ray
Train's storage, reports to the driver's event channel, placement through Ray's nodes)."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import ray
import ray.train
import ray.train.torch

from shardrun import checkpoint_format as layout
from shardrun import fs
from shardrun.errors import CheckpointStalled, redact
from shardrun.trainer.session import Session


class RayCheckpointStore:
    """Checkpoints through ray.train.report (merged per rank into the run's storage), committed by the
    controller; resumed from Ray's record of them, or from the newest complete one in storage when that is
    newer (the record was lost, or the run ended before Ray wrote it)."""

    def __init__(self, run_dir: str, *, upload_timeout_s: float):
        self.run_dir = run_dir
        self.upload_timeout_s = upload_timeout_s

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = self._newer_in_storage(ray.train.get_checkpoint())
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def _newer_in_storage(self, recorded: ray.train.Checkpoint | None) -> ray.train.Checkpoint | None:
        found = {c["step"]: c for c in layout.list_checkpoints(self.run_dir) if c["complete"]} \
            if fs.exists(self.run_dir) else {}
        recorded_step = layout.step_of(recorded.path) if recorded else None
        step = layout.resume_from(recorded_step, list(found))
        if step is None:
            return recorded
        if ray.train.get_context().get_world_rank() == 0:
            had = f"names step {recorded_step}" if recorded else "names no checkpoint"
            fs.log(f"Ray's record of this run's checkpoints {had}; resuming from the newest complete checkpoint "
                   f"in storage, {found[step]['path']}")
        storage, _ = fs.filesystem(self.run_dir)
        return ray.train.Checkpoint(path=found[step]["fs_path"], filesystem=storage)

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int, metrics: dict) -> Iterator[str]:
        staging = tempfile.mkdtemp(prefix=f"shardrun-step{step}-")
        try:
            yield staging
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(staging),
                checkpoint_dir_name=layout.ray_dir_name(step),
                checkpoint_upload_fn=self._upload,
            )
            # Wait until the controller has committed it. Reports queue on the workers until the
            # controller polls them: a group that dies before then would restart from an older
            # checkpoint (or none), though this one is already in storage.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            if ray.train.get_context().get_world_rank() == 0:
                fs.bounded(lambda: self._mark_committed(step), self.upload_timeout_s, lambda: CheckpointStalled(
                    f"rank 0: writing {layout.COMMIT} into checkpoint {redact(self._folder(step))} took more than "
                    f"failure.checkpoint_timeout_s ({self.upload_timeout_s:g} s): the storage stalls"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _folder(self, step: int) -> str:
        return fs.join(self.run_dir, layout.ray_dir_name(step))

    def _mark_committed(self, step: int) -> None:
        """The commit marker, once Ray Train has committed the checkpoint (every rank's upload done): every
        file's size as storage lists it, so that a file cut off or replaced later is seen."""
        sizes = layout.folder_sizes(*fs.filesystem(self._folder(step)))
        fs.write_json(fs.join(self._folder(step), layout.COMMIT), layout.commit_record(step, sizes))

    def _upload(self, checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """_upload_and_sync within failure.checkpoint_timeout_s: storage that stops answering ends this rank
        with the checkpoint named."""
        rank = ray.train.get_context().get_world_rank()
        return fs.bounded(lambda: _upload_and_sync(checkpoint, name), self.upload_timeout_s, lambda: CheckpointStalled(
            f"rank {rank}: uploading checkpoint {redact(fs.join(self.run_dir, name))} took more than "
            f"failure.checkpoint_timeout_s ({self.upload_timeout_s:g} s): the storage stalls"))


class RayReporter:
    """Rank 0's reports to the driver's event channel (an actor on the driver's node)."""

    def __init__(self, channel):
        self.channel = channel

    def started(self, info: dict) -> None:
        self.channel.started.remote(info)

    def progress(self, record: dict) -> None:
        self.channel.record.remote(record)

    def note(self, line: str) -> None:
        self.channel.note.remote(line)

    def stop_requested(self) -> bool:
        return ray.get(self.channel.stop_requested.remote(), timeout=30)

    def stopped(self) -> None:
        ray.get(self.channel.stopped.remote())

    def finished(self) -> None:
        ray.get(self.channel.finished.remote())

    def failed(self, rank: int, step: int | None, error: BaseException) -> str | None:
        try:
            return ray.get(self.channel.failed.remote(rank, step, type(error).__name__, str(error)), timeout=30)
        except Exception:  # noqa: BLE001 - the channel gone with the driver: the error goes up as it is
            return None


class RayPlacement:
    """Nodes through Ray: drain the node of a preempted VM, wait for drained nodes to go, and read Ray Train's
    mark of a drain by someone else."""

    def __init__(self):
        self._preemption = _preemption_context()

    def leaving(self, reason: str) -> tuple[str | None, str]:
        """Drain this node in Ray (reason preemption), as Ray's autoscaler does for a preempted node: nothing
        new is placed here, Ray Train's own watcher sees the drain, and the actors that die with the node
        count as preempted (failure.max_preemptions), not failed. The drain's deadline is now: once the event
        is acknowledged Azure may take the VM at any moment, and the GCS counts a drained node's death as a
        preemption only after the deadline (before it, as an unexpected failure).

        GcsClient.drain_node is what `ray drain-node` calls; Ray keeps it outside its stability guarantees,
        so a failure here only costs the drain. The head node is never drained (the cluster goes with it)."""
        try:
            from ray.core.generated import autoscaler_pb2

            node_id = ray.get_runtime_context().get_node_id()
            head = any(n["NodeID"] == node_id and "node:__internal_head__" in n.get("Resources", {})
                       for n in ray.nodes())
            if head:
                return None, "this is the head node, which is not drained: the whole cluster goes with it"
            gcs = ray._private.worker.global_worker.gcs_client
            accepted, why = gcs.drain_node(
                node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason,
                int(time.time() * 1000))
        except Exception as e:  # noqa: BLE001 - an internal API: drain if it works, stop without if not
            return None, f"Ray could not drain this node: {e!r}"
        if not accepted:
            return None, f"Ray refused to drain this node: {why}"
        return node_id, f"Ray drains node {node_id[:12]} (nothing new is placed there)"

    def wait_gone(self, nodes: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if not alive.intersection(nodes):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)

    def drain_notice(self) -> str | None:
        """Ray Train's own preemption watcher (a drain of one of this group's nodes: `ray drain-node`, an
        autoscaler, a spot reclaim) marks every worker; this reads the mark where ray.train.get_preemption_info
        reads it, without that call's barrier across the workers (the loop agrees on it in its step flags)."""
        info = getattr(self._preemption, "preemption_info", None)
        if info is None:
            return None
        deadline = ""
        if info.deadline_ms:
            deadline = ", to go by " + datetime.datetime.fromtimestamp(
                info.deadline_ms / 1000, datetime.timezone.utc).strftime("%H:%M:%S UTC")
        nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
        return f"Ray drains node(s) {nodes} of this run (ranks {list(info.preempted_ranks)}){deadline}"


def _preemption_context():
    """This worker's PreemptionContext: made once per worker actor, its preemption_info set in place by the
    controller's mark_preempt. Looked up once here, not on every step; None if Ray Train moved it (then
    drains by others only reach Ray Train's own handling)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context
    except Exception:  # noqa: BLE001 - an internal of Ray Train's: without it, no early checkpoint
        return None


def _upload_and_sync(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's own upload (pyarrow copy_files into the run's storage), then, on a local or shared disk,
    an fsync of the files this rank copied. It runs inside ray.train.report, before the report reaches the
    controller, so the checkpoint Ray commits as the latest is on the disk. Object stores keep their own
    promise (an object exists once its upload is complete)."""
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)
    if fs.is_local(persisted.filesystem):
        mine = [os.path.relpath(os.path.join(d, f), checkpoint.path)
                for d, _, files in os.walk(checkpoint.path) for f in files]
        fs.sync_tree(persisted.path, mine)
        fs.sync_dir(os.path.dirname(persisted.path))
    return persisted


def train_fn(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    use_gpu = config["spec"]["scaling"]["use_gpu"]
    from shardrun.trainer.extensions import choose_accelerator

    choose_accelerator(use_gpu)  # before DeepSpeed is imported
    # imported here: the driver, which pickles this function, needs no DeepSpeed
    from shardrun.trainer.entry import worker_main
    from shardrun.trainer.faults import FaultInjector
    from shardrun.trainer.topology import Topology

    # Ray Train's choice of this worker's GPU among the node's, which it shows to every worker of the node
    device = str(ray.train.torch.get_device()) if use_gpu else None

    store = RayCheckpointStore(config["run_dir"],
                               upload_timeout_s=config["spec"]["failure"]["checkpoint_timeout_s"])
    session = Session(store, RayReporter(config["events"]), RayPlacement())
    worker_main(config["spec"], session, Topology.from_env(use_gpu, device=device), data_index=config.get("data_index"),
                faults=FaultInjector.from_env())
