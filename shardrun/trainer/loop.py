"""The worker loop: build, restore, then batch -> forward/backward/step -> progress -> checkpoint."""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from shardrun import datasets
from shardrun.config import JobSpec
from shardrun.errors import Preempted, TrainingDiverged
from shardrun.metrics import WorkerMetrics, flops
from shardrun.trainer import checkpoint, engine, faults, models, preemption
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology


def worker_main(spec: JobSpec | dict, session: Session, topology: Topology | None = None, *,
                data_index: dict | None = None) -> TrainState:
    """Train one rank to spec.run.max_steps, resuming from the session's latest checkpoint."""
    if isinstance(spec, dict):
        spec = JobSpec.model_validate(spec)
    trainer = Trainer(spec, session, topology or Topology.from_env(spec.scaling.use_gpu), data_index)
    try:
        trainer.train()
    except RuntimeError as e:
        timeout = getattr(trainer, "_timeout", None)
        if timeout is None or "timed out" not in str(e).lower():
            raise
        raise RuntimeError(f"rank {trainer.topology.rank} waited more than failure.collective_timeout_s "
                           f"({timeout:g} s) at step {trainer.state.step} for another rank, which died or hangs: "
                           f"{e}") from e
    finally:
        trainer.close()
    return trainer.state


class Trainer:
    def __init__(self, spec: JobSpec, session: Session, topology: Topology, data_index: dict | None = None):
        self.spec = spec
        self.session = session
        self.topology = topology
        self.grad_accum = spec.grad_accum_for(topology.world_size)
        self.resized_from: int | None = None
        """The world size that wrote the checkpoint this group resumed from, when it was another."""
        self.universal = False
        """That checkpoint went through DeepSpeed's universal format."""
        engine.init_distributed(topology)
        self.control = None
        """A gloo group of its own for the per-step flags: on the host beside NCCL (no device sync), and
        apart from the training's collectives, which their background reduction must not race."""
        if dist.is_initialized() and topology.world_size > 1:
            self.control = dist.new_group(backend="gloo")
        self.flags = preemption.StepFlags(3, group=self.control)
        """preemption notice, stop request, a node drained by others: agreed one step behind, in the background"""
        self._drain_saved = False
        """The group checkpointed for a drain announced by the launcher (once per group)."""
        self.metrics = self.start_metrics()
        self.state, position = self.restore()
        self.stream = datasets.open(
            spec.data, self.topology, position,
            micro_batch_size=spec.deepspeed.micro_batch_size,
            grad_accum_steps=self.grad_accum, index=data_index, partitions=spec.partitions,
        )
        self.global_batch = self.stream.global_batch
        self.tokens_per_step = self.global_batch * spec.data.tokens_per_sample
        self.peak_flops = self._peak_flops()
        self._window_loss = torch.zeros((), device=self.topology.device)
        self._window_steps = 0
        self._window_finite = 0
        self._window_wait = 0.0
        self._window_start = time.perf_counter()
        self._skipped_steps = 0
        self._closed = threading.Event()
        self._nonfinite_run = 0
        """Consecutive steps whose loss was not finite."""
        self.nonfinite_steps = 0
        self._faults = bool(os.environ.get("SHARDRUN_FAULT"))
        self._poison = "nonfinite-loss" in os.environ.get("SHARDRUN_FAULT", "")
        self._delay = faults.step_delay()

    def build_engine(self, *, load_universal: bool = False) -> engine.DeepSpeedEngine:
        torch.manual_seed(self.spec.run.seed)  # every rank builds the same initial weights
        model = models.build(self.spec.model)
        # counted on the whole model: ZeRO-3 leaves each rank only a shard of the parameters
        self.flops_per_token = flops.flops_per_token(model, self.spec.data.seq_len or 1)
        return engine.build(model, self.spec, self.topology, load_universal=load_universal)

    def start_metrics(self) -> WorkerMetrics | None:
        """This rank's Prometheus endpoint; every rank's address goes to rank 0 for discovery."""
        self.endpoints: list[dict] = []
        if not self.spec.metrics.enabled:
            return None
        m = WorkerMetrics(self.spec.metrics, run=self.spec.name, rank=self.topology.rank,
                          local_rank=self.topology.local_rank)
        mine = {"rank": self.topology.rank, "address": m.address, "node": socket.gethostname()}
        if dist.is_initialized() and self.topology.world_size > 1:
            everyone: list = [None] * self.topology.world_size
            dist.all_gather_object(everyone, mine)
            self.endpoints = everyone
        else:
            self.endpoints = [mine]
        return m

    def _peak_flops(self) -> float | None:
        if self.spec.metrics.peak_flops:
            return self.spec.metrics.peak_flops
        if self.topology.device.startswith("cuda"):
            return flops.device_peak(torch.cuda.get_device_name(self.topology.device),
                                     self.spec.deepspeed.precision)
        return None  # CPUs: no table of peaks; set metrics.peak_flops to get MFU

    def close(self) -> None:
        self._closed.set()
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        self.stream.close()
        if self.metrics is not None:
            self.metrics.close()

    def restore(self) -> tuple[TrainState, dict | None]:
        """Build the engine and load the latest checkpoint into it, converted if another world size
        wrote it; returns the train state and the data position (None: a new run)."""
        with self.session.latest_checkpoint() as path:
            if path is None:
                self.engine = self.build_engine()
                checkpoint.seed_rank(self.spec.run.seed, self.topology.rank)
                return TrainState(), None
            t0 = time.perf_counter()
            manifest = checkpoint.read_manifest(path)
            if manifest["world_size"] != self.topology.world_size:
                self.resized_from = manifest["world_size"]
            universal = None
            if checkpoint.needs_universal(manifest, self.topology):
                universal = checkpoint.to_universal(path, manifest, self.topology, self.spec.name)
                self.universal = True
            try:
                self.engine = self.build_engine(load_universal=universal is not None)
                loaded = checkpoint.load(self.engine, path, self.topology, manifest, universal=universal,
                                         seed=self.spec.run.seed)
            finally:
                if universal is not None:
                    checkpoint.remove_universal(self.spec.name, self.topology)
            if self.metrics is not None:
                self.metrics.checkpoint_loaded(time.perf_counter() - t0)
            return loaded

    def train(self) -> None:
        self._check_nonfinite_policy()
        self.start_watching()
        if self.topology.is_main:
            self.session.started({**vars(self.state), "world_size": self.topology.world_size,
                                  "endpoints": self.endpoints, "resized_from": self.resized_from,
                                  "universal": self.universal, "grad_accum_steps": self.grad_accum,
                                  "global_batch": self.global_batch})
        start = self.state.step
        self._saved_step = start
        while self.state.step < self.spec.run.max_steps:
            loss = self.train_step()
            if self._faults:
                faults.maybe_fail("stall", step=self.state.step, rank=self.topology.rank)
            if self.state.step == start + 1:  # the slow first step (allocations, compiles) is behind us
                self.collective_timeout(self.spec.failure.collective_timeout_s)
            self._window_steps += 1
            # one host-side collective per step, in the background: preemption notice, stop request, drain
            preempt, stop, drained = self.flags.exchange(
                [self.watcher is not None and self.watcher.notice is not None, self._stop_request.is_set(),
                 not self._drain_saved and self.session.drain_notice() is not None])
            if self.update_was_skipped():
                self.on_nonfinite()
            else:
                self._window_loss += loss
                self._window_finite += 1
                self._nonfinite_run = 0
            step = self.state.step
            if step == start + 1 or step % self.spec.run.log_every == 0 or self.done or preempt or stop:
                self.log_progress()
            if step % self.spec.checkpoint.every_steps == 0 or self.done:
                self.save_checkpoint()
            if drained and not self._drain_saved and not (preempt or stop):
                self.checkpoint_for_drain()
            if preempt or stop:
                self.flags.settle()  # nothing left in flight on the control group
                self.stop_here(preempt)
                return
        self.flags.settle()  # the last step's reduction, before the process group goes
        if self.topology.is_main:
            self.session.finished()

    def start_watching(self) -> None:
        """Azure Scheduled Events on the first rank of each VM; stop requests (ray job stop, SIGTERM)
        polled on rank 0. Both only set flags that the loop reads at a step boundary."""
        self.watcher = None
        self._stop_request = threading.Event()
        endpoint = preemption.endpoint_for(self.spec.failure.scheduled_events)
        if endpoint and self.topology.local_rank == 0:
            self.watcher = preemption.PreemptionWatcher(preemption.ScheduledEvents(endpoint), emit=_log).start()
        if self.topology.is_main:
            threading.Thread(target=self._poll_stop, name="shardrun-stop", daemon=True).start()

    def _poll_stop(self, every: float = 2.0) -> None:
        while not self._stop_request.is_set() and not self._closed.wait(every):
            try:
                if self.session.stop_requested():
                    self._stop_request.set()
            except Exception as e:  # the driver may be gone; its loss ends the group anyway
                _log(f"could not ask for a stop request: {e!r}")
                return

    def stop_here(self, preempt: bool) -> None:
        """Checkpoint this step (unless just saved); on a preemption, acknowledge the event, drain the VM's
        node and wait for it to go before the group ends; on a stop request, end the run."""
        t0 = time.perf_counter()
        if self._saved_step != self.state.step:
            self.save_checkpoint()
        seconds = time.perf_counter() - t0
        step = self.state.step
        if not preempt:
            if self.topology.is_main:
                self.session.note(f"stop requested: checkpoint of step {step} written in {seconds:.2f} s; "
                                  "start the run again (same name) to resume")
                self.session.stopped()
            return
        drained, left = None, 0.0
        notice = self.watcher.notice if self.watcher is not None else None
        if notice is not None:
            self.watcher.acknowledge()
            if notice.not_before is not None:
                left = (notice.not_before - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
            drained, what = self.session.leaving(f"{notice.event_type} {notice.event_id}")
            _log(f"preemption: {what}")
        nodes, left = self._gather_leaving(drained, left)
        if self.topology.is_main:
            self.session.note(f"preemption: checkpoint of step {step} written in {seconds:.2f} s; "
                              + (f"waiting for {len(nodes)} drained node(s) to go, then the run resumes from it "
                                 "on the nodes left" if nodes else "this worker group stops and the run resumes "
                                 "from it"))
        if nodes:
            # Ray Train's controller restarts the group once the drained nodes' actors die with them (counted
            # as preempted). Ending the group before they are gone would have Ray Train count the draining
            # node's resources and try to start the whole group there again.
            wait = max(left, 0.0) + preemption.WAIT_MARGIN_S
            if not self.session.wait_gone(nodes, timeout=wait):
                _log(f"preemption: the drained node(s) were still there {wait:.0f} s later; the group stops anyway")
        raise Preempted(f"a VM of this run is being taken away (Azure Scheduled Events); checkpointed step {step}")

    def checkpoint_for_drain(self) -> None:
        """A node of this group is being drained by someone else (Ray's preemption watcher told every worker):
        checkpoint now, once, and go on training. When the node goes, Ray Train restarts the group on the nodes
        left, from this checkpoint or a later one, and counts it against failure.max_preemptions; a drain that
        is cancelled costs only the save."""
        self._drain_saved = True
        t0 = time.perf_counter()
        if self._saved_step != self.state.step:
            self.save_checkpoint()
        if self.topology.is_main:
            what = self.session.drain_notice() or "a node of this run is being drained"
            self.session.note(f"{what}: checkpoint of step {self.state.step} written in "
                              f"{time.perf_counter() - t0:.2f} s; training goes on until the node goes, then "
                              "the run resumes from its latest checkpoint on the nodes left")

    def _gather_leaving(self, drained: str | None, left: float) -> tuple[list[str], float]:
        """Every rank learns which nodes were drained and the earliest notice left (one gather, on a
        preemption only)."""
        if not (dist.is_initialized() and self.topology.world_size > 1):
            return ([drained] if drained else []), left
        everyone: list = [None] * self.topology.world_size
        dist.all_gather_object(everyone, (drained, left if drained else None), group=self.control)
        nodes = sorted({node for node, _ in everyone if node})
        lefts = [seconds for node, seconds in everyone if node and seconds is not None]
        return nodes, (min(lefts) if lefts else 0.0)

    def _check_nonfinite_policy(self) -> None:
        d = self.spec.deepspeed
        # DeepSpeed's ZeRO and bf16 optimizers discard an update whose gradient norm is not finite (and
        # count it in engine.skipped_steps, the same on every rank); without either (ZeRO stage 0 in
        # fp32) the update is applied, and the log step's loss tells. fp16's loss scaler skips steps as
        # it backs off: those are DeepSpeed's own business.
        self._can_skip = not (d.zero_stage == 0 and d.precision == "fp32")
        self._count_skips = self._can_skip and d.precision != "fp16"
        self._ds_skipped = self._engine_skipped()

    def _engine_skipped(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def update_was_skipped(self) -> bool:
        """DeepSpeed left this step's update out: its gradients were not finite (a host counter, no sync)."""
        if not self._count_skips:
            return False
        before, self._ds_skipped = self._ds_skipped, self._engine_skipped()
        return self._ds_skipped > before

    def on_nonfinite(self) -> None:
        """DeepSpeed skipped this step's update (its loss or gradients were not finite on some rank): count,
        log, and apply failure.nonfinite_loss."""
        self._nonfinite_run += 1
        self.nonfinite_steps += 1
        failure = self.spec.failure
        where = f"step {self.state.step}: the loss or the gradients are not finite"
        if failure.nonfinite_loss == "stop":
            raise TrainingDiverged(f"{where} (failure.nonfinite_loss: stop): {NONFINITE_ADVICE}")
        if self._nonfinite_run >= failure.max_nonfinite_steps:
            raise TrainingDiverged(f"{where}, {self._nonfinite_run} steps in a row (failure.max_nonfinite_steps: "
                                   f"{failure.max_nonfinite_steps}): {NONFINITE_ADVICE}")
        if self.topology.is_main:
            self.session.note(f"{where}; DeepSpeed skipped the update ({self._nonfinite_run} in a row, "
                              f"{self.nonfinite_steps} in this run so far)")

    @property
    def done(self) -> bool:
        return self.state.step >= self.spec.run.max_steps

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device)."""
        t0 = time.perf_counter()
        wait0 = self.stream.wait_seconds
        total = torch.zeros((), device=self.topology.device)
        for _ in range(self.grad_accum):
            batch = self.stream.next_batch()
            if "inputs" in batch:
                loss = self.engine(batch["inputs"], batch["targets"])
            else:  # table data: the model takes the columns (and `label`) as keyword arguments
                loss = self.engine(**batch)
            if self._poison and faults.active("nonfinite-loss", step=self.state.step + 1, rank=self.topology.rank):
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        if self._delay:
            time.sleep(self._delay)
        self.state.step += 1
        self.state.samples += self.global_batch
        self.state.tokens += self.tokens_per_step
        wait = self.stream.wait_seconds - wait0
        self._window_wait += wait
        if self.metrics is not None:  # host-side time: no device sync here
            world = self.topology.world_size
            self.metrics.step_done(step=self.state.step, seconds=time.perf_counter() - t0, data_wait=wait,
                                   samples=self.global_batch // world, tokens=self.tokens_per_step // world)
        return total / self.grad_accum

    def log_progress(self) -> None:
        """Mean loss of the window over all ranks (one small all-reduce), sent by rank 0."""
        loss = self._window_loss / max(1, self._window_finite) if self._window_finite else \
            torch.full((), float("nan"), device=self.topology.device)
        if dist.is_initialized() and self.topology.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.topology.world_size
        loss_value = loss.item()  # waits for the device, so the time below is real
        if not self._can_skip and not math.isfinite(loss_value):
            raise TrainingDiverged(f"step {self.state.step}: the loss is {loss_value}; with ZeRO stage 0 in fp32 "
                                   "DeepSpeed applies updates whatever their gradients, so the weights are no "
                                   f"longer trustworthy. Stopped: {NONFINITE_ADVICE}")
        elapsed = time.perf_counter() - self._window_start
        tokens_per_s = self._window_steps * self.tokens_per_step / elapsed
        skipped = int(getattr(self.engine, "skipped_steps", 0) or 0)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        mfu = None
        if self.peak_flops and tokens_per_s:
            mfu = tokens_per_s / self.topology.world_size * self.flops_per_token / self.peak_flops
        record = {
            **vars(self.state),
            "loss": loss_value,
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens_per_s,
            "samples_per_s": self._window_steps * self.global_batch / elapsed,
            "step_time": elapsed / self._window_steps,
            "data_wait_fraction": self._window_wait / elapsed,
            "grad_norm": grad_norm,
            "mfu": mfu,
        }
        if self.metrics is not None:
            scale = getattr(self.engine.optimizer, "cur_scale", None) if self.spec.deepspeed.precision == "fp16" \
                else None
            memory = None
            if self.topology.device.startswith("cuda"):
                memory = (torch.cuda.memory_allocated(self.topology.device),
                          torch.cuda.memory_reserved(self.topology.device))
            self.metrics.logged(loss=loss_value, lr=record["lr"], grad_norm=grad_norm, loss_scale=scale, mfu=mfu,
                                skipped_steps=skipped - self._skipped_steps, data=self.stream.stats(),
                                world_size=self.topology.world_size, memory=memory)
        self._skipped_steps = skipped
        if self.topology.is_main:
            self.session.progress(record)
        self._window_loss.zero_()
        self._window_steps = 0
        self._window_finite = 0
        self._window_wait = 0.0
        self._window_start = time.perf_counter()

    def collective_timeout(self, seconds: float) -> None:
        """How long a collective may wait for the other ranks before it fails the group."""
        if dist.is_initialized() and self.topology.world_size > 1:
            for group in (None, self.control):  # the training's group, and the flags' own
                distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
        self._timeout = seconds

    def save_checkpoint(self) -> None:
        short = getattr(self, "_timeout", None)
        if short is not None:  # ranks wait at barriers for the slowest writer: the default timeout
            self.collective_timeout(LONG_TIMEOUT_S)
        try:
            self._save_checkpoint()
        finally:
            if short is not None:
                self.collective_timeout(short)

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        metrics = {**vars(self.state)}
        self._saved_step = self.state.step
        with self.session.checkpoint_dir(self.state.step, metrics) as directory:
            checkpoint.save(self.engine, directory, self.state, self.stream.position(), self.topology,
                            zero_stage=self.spec.deepspeed.zero_stage, precision=self.spec.deepspeed.precision)
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.checkpoint_saved(seconds)
        # the save's time is not training throughput
        self._window_start += seconds


NONFINITE_ADVICE = ("lower deepspeed.optimizer.lr, lengthen deepspeed.schedule.warmup_steps, keep "
                    "deepspeed.grad_clip on, or look for bad values in the data; started again, the run resumes "
                    "from its latest checkpoint")

LONG_TIMEOUT_S = 1800.0
"""torch's and Ray Train's default collective timeout: group start-up and checkpoint saves."""


def _log(line: str) -> None:
    print(f"[shardrun] {line}", file=sys.stderr, flush=True)
