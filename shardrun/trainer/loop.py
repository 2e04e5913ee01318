"""The worker loop: batch -> forward/backward/step -> progress -> checkpoint, and the step boundary.

Its collaborators each own one job: StepControl (what the ranks agreed on after a step, decided as a
StepAction), LogWindow (the progress record), NonFinitePolicy, Checkpointer, FaultInjector (a no-op unless a
test asks). shardrun.trainer.entry builds them.
"""

from __future__ import annotations

import torch

from shardrun.config import JobSpec
from shardrun.errors import TrainingDiverged
from shardrun.fs import log
from shardrun.metrics import WorkerMetrics, device_memory, flops
from shardrun.trainer import engine as engines
from shardrun.trainer import models
from shardrun.trainer.azure_events import PreemptionWatcher
from shardrun.trainer.checkpointer import Checkpointer
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.control import StepControl
from shardrun.trainer.evaluate import Evaluator, is_due
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.nonfinite import NonFiniteAction, NonFinitePolicy
from shardrun.trainer.restore import Restored
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology
from shardrun.trainer.window import LogWindow


class Trainer:
    """Composes a rank's parts, and trains: train() calls train_step() and acts at each step boundary."""

    def __init__(self, spec: JobSpec, session: Session, topology: Topology, *, restored: Restored, stream,
                 collectives: Collectives, faults: FaultInjector, metrics: WorkerMetrics | None = None,
                 endpoints: list | None = None, watcher: PreemptionWatcher | None = None,
                 evaluator: Evaluator | None = None):
        self.spec, self.session, self.topology, self.faults = spec, session, topology, faults
        self.restored, self.stream, self.collectives, self.metrics = restored, stream, collectives, metrics
        self.endpoints = endpoints or []
        self.evaluator = evaluator
        self.engine, self.state = restored.engine, restored.state
        self.grad_accum = spec.grad_accum_for(topology.world_size)
        self.float_dtype = engines.module_dtype(spec.deepspeed.precision)
        self.global_batch = self.stream.global_batch
        self.tokens_per_step = self.global_batch * spec.data.tokens_per_sample
        peak = flops.peak_flops(spec.metrics.peak_flops, topology.device, spec.deepspeed.precision)
        self.window = LogWindow(device=topology.device, tokens_per_step=self.tokens_per_step,
                                global_batch=self.global_batch, world_size=topology.world_size,
                                flops_per_token=self.restored.flops_per_token, peak_flops=peak)
        self.nonfinite = NonFinitePolicy(spec.failure, spec.deepspeed, engines.skipped_steps(self.engine))
        self.checkpointer = Checkpointer(spec, session.store, topology, self.collectives, engine=self.engine,
                                         position=self.stream.position, saved_step=self.state.step,
                                         metrics=self.metrics, faults=faults)
        self.control = StepControl(session, topology, collectives, watcher=watcher, emit=log)
        self.last_wait = 0.0
        """Seconds the last step waited for data."""
        self._skipped_logged = engines.skipped_steps(self.engine)
        self.takes_positions: bool | None = None
        """Whether the model's forward takes position_ids; asked when the data first has them."""

    def train(self) -> None:
        self.control.start()
        if self.topology.is_main:
            self.session.reporter.started(self.start_info())
            device = self.topology.device
            advice = engines.precision_advice(device, self.spec.deepspeed.precision,
                                              torch.cuda.get_device_capability(device) if device != "cpu" else None)
            if advice:
                self.session.reporter.note(advice)
        start = self.state.step
        if self.evaluator is not None and self.spec.eval.at_start and start == 0:
            self.evaluate()  # the baseline: the model as loaded
        while self.state.step < self.spec.run.max_steps:
            loss = self.train_step()
            self.faults.after_step(step=self.state.step, rank=self.topology.rank)
            if self.state.step == start + 1:  # the slow first step (allocations, compiles) is behind us
                self.collectives.set_timeout(self.spec.failure.collective_timeout_s)
            action = self.control.next_action()  # the flags of the step before, agreed one step behind
            skipped = self.nonfinite.was_skipped(engines.skipped_steps(self.engine))
            self.window.add(None if skipped else loss, self.last_wait)
            self.act(self.nonfinite.on_step(self.state.step, skipped))
            done = self.state.step >= self.spec.run.max_steps
            step = self.state.step
            if step == start + 1 or step % self.spec.run.log_every == 0 or done or action.ends_group:
                self.log_progress()
            if self.evaluator is not None and is_due(self.spec, step, last=done):
                self.evaluate()
            self.window.exclude(self.checkpointer.save(self.state, last_step=done))
            self.control.carry_out(action, self.state, self.checkpointer)
            if action.ends_group:
                return
        self.control.settle()  # the last step's reduction, before the process group goes
        if self.topology.is_main:
            self.session.reporter.finished()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device)."""
        t0 = self.window.clock()
        wait0 = self.stream.wait_seconds
        total = torch.zeros((), device=self.topology.device)
        for _ in range(self.grad_accum):
            batch = self.stream.next_batch()
            if "inputs" in batch:
                loss = self.engine(batch["inputs"], batch["targets"], **self.positions(batch))
            else:  # table data: the model takes the columns (and `label`) as keyword arguments
                loss = self.engine(**self.as_module_dtype(batch))
            loss = self.faults.loss(loss, step=self.state.step + 1, rank=self.topology.rank)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        self.faults.delay()
        self.state.step += 1
        self.state.samples += self.global_batch
        self.state.tokens += self.tokens_per_step
        self.last_wait = self.stream.wait_seconds - wait0
        if self.metrics is not None:  # host-side time: no device sync here
            world = self.topology.world_size
            self.metrics.step_done(step=self.state.step, seconds=self.window.clock() - t0, data_wait=self.last_wait,
                                   samples=self.global_batch // world, tokens=self.tokens_per_step // world)
        return total / self.grad_accum

    def positions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The packed rows' position ids, for a model whose forward takes them."""
        if "position_ids" not in batch:
            return {}
        if self.takes_positions is None:
            self.takes_positions = models.takes_positions(self.engine.module)
            if not self.takes_positions and self.topology.is_main:
                self.session.reporter.note("the data's rows pack several documents with their position_ids, but "
                                           "the model's forward takes no position_ids: positions run on across "
                                           "document boundaries")
        return {"position_ids": batch["position_ids"]} if self.takes_positions else {}

    def as_module_dtype(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Table columns as the module takes them (engine.as_module_dtype)."""
        return engines.as_module_dtype(batch, self.float_dtype)

    def log_progress(self) -> None:
        """The window's loss over all ranks (one small all-reduce) in the progress record, sent by rank 0."""
        loss = self.collectives.mean(self.window.mean_loss()).item()  # waits for the device: the time is real
        self.act(self.nonfinite.on_log(self.state.step, loss))
        grad_norm = self.engine.get_global_grad_norm()
        record = self.window.record(vars(self.state), loss=loss, lr=self.engine.get_lr()[0],
                                    grad_norm=float(grad_norm) if grad_norm is not None else None)
        if self.metrics is not None:
            self.metrics_logged(record)
        if self.topology.is_main:
            self.session.reporter.progress(record)

    def evaluate(self) -> None:
        """The held-out loss after this step (every rank takes part), reported by rank 0; its time is kept out
        of the step timings."""
        result = self.evaluator.evaluate(self.engine, self.collectives)
        self.checkpointer.evaluated = (self.state.step, result["eval_loss"])  # a checkpoint of this step records it
        self.window.exclude(result["eval_seconds"])
        if self.metrics is not None:
            self.metrics.evaluated(result["eval_loss"])
        if self.topology.is_main:
            self.session.reporter.progress({"step": self.state.step, **result})

    def metrics_logged(self, record: dict) -> None:
        skipped = engines.skipped_steps(self.engine)
        self.metrics.logged(loss=record["loss"], lr=record["lr"], grad_norm=record["grad_norm"], mfu=record["mfu"],
                            loss_scale=engines.loss_scale(self.engine, self.spec.deepspeed.precision),
                            skipped_steps=skipped - self._skipped_logged, data=self.stream.stats(),
                            world_size=self.topology.world_size, memory=device_memory(self.topology.device))
        self._skipped_logged = skipped

    def act(self, action: NonFiniteAction) -> None:
        if action.diverged:
            raise TrainingDiverged(action.diverged)
        if action.note and self.topology.is_main:
            self.session.reporter.note(action.note)

    def start_info(self) -> dict:
        return {**vars(self.state), "world_size": self.topology.world_size, "endpoints": self.endpoints,
                "resized_from": self.restored.resized_from, "universal": self.restored.universal,
                "grad_accum_steps": self.grad_accum, "global_batch": self.global_batch}

    def close(self) -> None:
        self.control.close()
        self.stream.close()
        if self.metrics is not None:
            self.metrics.close()
