"""When the loop checkpoints, and what a save costs it: checkpoint.every_steps, the last step saved, the long
collective timeout while ranks wait for the slowest writer, and the save's time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

from shardrun.config import JobSpec
from shardrun.metrics import WorkerMetrics
from shardrun.trainer import checkpoint
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.session import CheckpointStore
from shardrun.trainer.topology import Topology

UNRANKED = 1e30
"""The eval_loss Ray Train's retention reads for a checkpoint without an evaluation: finite, for its snapshot is
JSON (which turns infinity into null, which it then cannot rank), and above any loss."""


class Checkpointer:
    """Saves through the store, every checkpoint.every_steps and at the last step; at most once per step."""

    def __init__(self, spec: JobSpec, store: CheckpointStore, topology: Topology, collectives: Collectives, *,
                 engine, position: Callable[[], dict], saved_step: int, metrics: WorkerMetrics | None = None,
                 faults: FaultInjector | None = None, clock: Callable[[], float] = time.perf_counter):
        self.every_steps = spec.checkpoint.every_steps
        self.zero_stage, self.precision = spec.deepspeed.zero_stage, spec.deepspeed.precision
        self.store, self.topology, self.collectives, self.engine = store, topology, collectives, engine
        self.position = position
        """The data position after the last step (the stream's)."""
        self.saved_step = saved_step
        """The step of the last checkpoint (or the step the run resumed from)."""
        self.metrics, self.faults, self.clock = metrics, faults, clock
        self.keep_best = spec.checkpoint.keep_best
        self.base_model = spec.model.adapter_base
        self.evaluated: tuple[int, float] | None = None
        """(step, held-out loss) of the last evaluation: a checkpoint of that step records it."""

    def due(self, step: int, *, last_step: bool) -> bool:
        return step % self.every_steps == 0 or last_step

    def save(self, state: TrainState, *, last_step: bool = False) -> float:
        """Checkpoint `state` if it is due; returns the seconds it took (0 when none was due)."""
        if not self.due(state.step, last_step=last_step):
            return 0.0
        return self.save_now(state)

    def save_now(self, state: TrainState) -> float:
        """Checkpoint `state` unless it was just saved; returns the seconds it took."""
        if self.saved_step == state.step:
            return 0.0
        t0 = self.clock()
        self.saved_step = state.step
        eval_loss = self.evaluated[1] if self.evaluated and self.evaluated[0] == state.step else None
        reported = asdict(state)
        if eval_loss is not None or self.keep_best:  # Ray Train ranks by it; a step without one ranks last
            reported["eval_loss"] = UNRANKED if eval_loss is None else eval_loss
        with self.collectives.long_timeout(), self.store.checkpoint_dir(state.step, reported) as directory:
            checkpoint.save(self.engine, directory, state, self.position(), self.topology, zero_stage=self.zero_stage,
                            precision=self.precision, faults=self.faults, eval_loss=eval_loss,
                            base_model=self.base_model)
        seconds = self.clock() - t0
        if self.metrics is not None:
            self.metrics.checkpoint_saved(seconds)
        return seconds
