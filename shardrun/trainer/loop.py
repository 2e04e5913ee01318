"""The worker loop: build, restore, then batch -> forward/backward/step -> progress -> checkpoint."""

from __future__ import annotations

import socket
import time

import torch
import torch.distributed as dist

from shardrun import datasets
from shardrun.config import JobSpec
from shardrun.metrics import WorkerMetrics, flops
from shardrun.trainer import checkpoint, engine, models
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
    finally:
        trainer.close()
    return trainer.state


class Trainer:
    def __init__(self, spec: JobSpec, session: Session, topology: Topology, data_index: dict | None = None):
        self.spec = spec
        self.session = session
        self.topology = topology
        self.engine = self.build_engine()
        self.metrics = self.start_metrics()
        t0 = time.perf_counter()
        self.state, position = self.restore()
        if self.metrics is not None and self.state.step:
            self.metrics.checkpoint_loaded(time.perf_counter() - t0)
        self.stream = datasets.open(
            spec.data, self.topology, position,
            micro_batch_size=spec.deepspeed.micro_batch_size,
            grad_accum_steps=spec.deepspeed.grad_accum_steps, index=data_index,
        )
        self.global_batch = self.stream.global_batch
        self.tokens_per_step = self.global_batch * spec.data.tokens_per_sample
        self.peak_flops = self._peak_flops()
        self._window_loss = torch.zeros((), device=self.topology.device)
        self._window_steps = 0
        self._window_wait = 0.0
        self._window_start = time.perf_counter()
        self._skipped_steps = 0

    def build_engine(self) -> engine.DeepSpeedEngine:
        torch.manual_seed(self.spec.run.seed)  # every rank builds the same initial weights
        model = models.build(self.spec.model)
        # counted on the whole model: ZeRO-3 leaves each rank only a shard of the parameters
        self.flops_per_token = flops.flops_per_token(model, self.spec.data.seq_len or 1)
        return engine.build(model, self.spec, self.topology)

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
        self.stream.close()
        if self.metrics is not None:
            self.metrics.close()

    def restore(self) -> tuple[TrainState, dict | None]:
        with self.session.latest_checkpoint() as path:
            if path is None:
                checkpoint.seed_rank(self.spec.run.seed, self.topology.rank)
                return TrainState(), None
            return checkpoint.load(self.engine, path, self.topology)

    def train(self) -> None:
        if self.topology.is_main:
            self.session.started({**vars(self.state), "world_size": self.topology.world_size,
                                  "endpoints": self.endpoints})
        start = self.state.step
        while self.state.step < self.spec.run.max_steps:
            self._window_loss += self.train_step()
            self._window_steps += 1
            step = self.state.step
            if step == start + 1 or step % self.spec.run.log_every == 0 or self.done:
                self.log_progress()
            if step % self.spec.checkpoint.every_steps == 0 or self.done:
                self.save_checkpoint()
        if self.topology.is_main:
            self.session.finished()

    @property
    def done(self) -> bool:
        return self.state.step >= self.spec.run.max_steps

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device)."""
        t0 = time.perf_counter()
        wait0 = self.stream.wait_seconds
        total = torch.zeros((), device=self.topology.device)
        for _ in range(self.spec.deepspeed.grad_accum_steps):
            batch = self.stream.next_batch()
            if "inputs" in batch:
                loss = self.engine(batch["inputs"], batch["targets"])
            else:  # table data: the model takes the columns (and `label`) as keyword arguments
                loss = self.engine(**batch)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        self.state.step += 1
        self.state.samples += self.global_batch
        self.state.tokens += self.tokens_per_step
        wait = self.stream.wait_seconds - wait0
        self._window_wait += wait
        if self.metrics is not None:  # host-side time: no device sync here
            world = self.topology.world_size
            self.metrics.step_done(step=self.state.step, seconds=time.perf_counter() - t0, data_wait=wait,
                                   samples=self.global_batch // world, tokens=self.tokens_per_step // world)
        return total / self.spec.deepspeed.grad_accum_steps

    def log_progress(self) -> None:
        """Mean loss of the window over all ranks (one small all-reduce), sent by rank 0."""
        loss = self._window_loss / self._window_steps
        if dist.is_initialized() and self.topology.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.topology.world_size
        loss_value = loss.item()  # waits for the device, so the time below is real
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
        self._window_wait = 0.0
        self._window_start = time.perf_counter()

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        metrics = {**vars(self.state)}
        with self.session.checkpoint_dir(self.state.step, metrics) as directory:
            checkpoint.save(self.engine, directory, self.state, self.stream.position(),
                            self.topology)
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.checkpoint_saved(seconds)
        # the save's time is not training throughput
        self._window_start += seconds
