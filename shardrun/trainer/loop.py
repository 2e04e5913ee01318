"""The worker loop: build, restore, then batch -> forward/backward/step -> progress -> checkpoint."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardrun import datasets
from shardrun.config import JobSpec
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
        trainer.stream.close()
    return trainer.state


class Trainer:
    def __init__(self, spec: JobSpec, session: Session, topology: Topology, data_index: dict | None = None):
        self.spec = spec
        self.session = session
        self.topology = topology
        self.engine = self.build_engine()
        self.state, position = self.restore()
        self.stream = datasets.open(
            spec.data, self.topology, position,
            micro_batch_size=spec.deepspeed.micro_batch_size,
            grad_accum_steps=spec.deepspeed.grad_accum_steps, index=data_index,
        )
        self.global_batch = self.stream.global_batch
        self.tokens_per_step = self.global_batch * spec.data.tokens_per_sample
        self._window_loss = torch.zeros((), device=self.topology.device)
        self._window_steps = 0
        self._window_start = time.perf_counter()

    def build_engine(self) -> engine.DeepSpeedEngine:
        torch.manual_seed(self.spec.run.seed)  # every rank builds the same initial weights
        model = models.build(self.spec.model)
        return engine.build(model, self.spec, self.topology)

    def restore(self) -> tuple[TrainState, dict | None]:
        with self.session.latest_checkpoint() as path:
            if path is None:
                checkpoint.seed_rank(self.spec.run.seed, self.topology.rank)
                return TrainState(), None
            return checkpoint.load(self.engine, path, self.topology)

    def train(self) -> None:
        if self.topology.is_main:
            self.session.started({**vars(self.state), "world_size": self.topology.world_size})
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
        return total / self.spec.deepspeed.grad_accum_steps

    def log_progress(self) -> None:
        """Mean loss of the window over all ranks (one small all-reduce), sent by rank 0."""
        loss = self._window_loss / self._window_steps
        if dist.is_initialized() and self.topology.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.topology.world_size
        loss_value = loss.item()  # waits for the device, so the time below is real
        elapsed = time.perf_counter() - self._window_start
        record = {
            **vars(self.state),
            "loss": loss_value,
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": self._window_steps * self.tokens_per_step / elapsed,
            "samples_per_s": self._window_steps * self.global_batch / elapsed,
            "step_time": elapsed / self._window_steps,
        }
        if self.topology.is_main:
            self.session.progress(record)
        self._window_loss.zero_()
        self._window_steps = 0
        self._window_start = time.perf_counter()

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        metrics = {**vars(self.state)}
        with self.session.checkpoint_dir(self.state.step, metrics) as directory:
            checkpoint.save(self.engine, directory, self.state, self.stream.position(),
                            self.topology)
        # the save's time is not training throughput
        self._window_start += time.perf_counter() - t0
