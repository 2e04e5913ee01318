"""The worker's entry: build a rank's parts (process group, metrics, engine restored, data at its position),
then train them with the loop.

Start-up hook: the logger `shardrun.trainer.startup` gets an INFO record "engine ready" (its attribute
`engine`: the DeepSpeed engine, restored) and then "data open", the first step next. Benchmarks time the
worker's start-up with it; the logger's level is left to whoever listens.
"""

from __future__ import annotations

import logging

from shardrun import datasets
from shardrun.config import JobSpec
from shardrun.errors import Preempted, RepeatedFailure, TrainingDiverged, UserError
from shardrun.trainer import engine as engines
from shardrun.trainer import models
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.control import FLAGS, watcher_for
from shardrun.trainer.endpoints import start_metrics
from shardrun.trainer.evaluate import Evaluator
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.loop import Trainer
from shardrun.trainer.restore import restore
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology

startup = logging.getLogger("shardrun.trainer.startup")
startup.propagate = False  # only its own listeners: a launcher's root handler (Ray's JSON one) cannot format it


def worker_main(spec: JobSpec | dict, session: Session, topology: Topology | None = None, *,
                data_index: dict | None = None, faults: FaultInjector | None = None) -> TrainState:
    """Train one rank to spec.run.max_steps, resuming from the session's latest checkpoint; returns the
    TrainState reached."""
    if isinstance(spec, dict):
        spec = JobSpec.model_validate(spec)
    topology = topology or Topology.from_env(spec.scaling.use_gpu)
    trainer: Trainer | None = None
    try:
        trainer = build(spec, session, topology, data_index=data_index, faults=faults or FaultInjector())
        trainer.train()
    except Exception as e:
        ended = ended_by(e, trainer, session, topology.rank)
        if ended is e:
            raise
        raise ended from ended.__cause__
    finally:
        if trainer is not None:
            trainer.close()
    return trainer.state


def ended_by(error: Exception, trainer: Trainer | None, session: Session, rank: int) -> Exception:
    """The error this rank ends with: a deterministic one (bad input, a diverged loss) or a preemption as it is;
    a collective that timed out said in shardrun's words; the same error at the same step as in earlier
    attempts of the group, as many as failure.same_failure_limit, a RepeatedFailure (not retried)."""
    if isinstance(error, UserError | TrainingDiverged | Preempted):
        return error
    step = trainer.state.step if trainer is not None else None
    timeout = trainer.collectives.timeout if trainer is not None else None
    if isinstance(error, RuntimeError) and timeout is not None and "timed out" in str(error).lower():
        said = RuntimeError(f"rank {rank} waited more than failure.collective_timeout_s ({timeout:g} s) at step "
                            f"{step} for another rank, which died or hangs: {error}")
        said.__cause__, error = error, said
    repeated = session.reporter.failed(rank, step, error)
    if repeated is None:
        return error
    ended = RepeatedFailure(repeated)
    ended.__cause__ = error
    return ended


def build(spec: JobSpec, session: Session, topology: Topology, *, data_index: dict | None,
          faults: FaultInjector) -> Trainer:
    """Join the process group, start this rank's metrics, restore the engine, open the data at its position."""
    engines.init_distributed(topology)
    collectives = Collectives(topology, FLAGS)
    metrics, endpoints = start_metrics(spec, topology, collectives)
    restored = restore(spec, session.store, topology, metrics)
    startup.info("engine ready", extra={"engine": restored.engine})
    vocab = models.vocab_size(spec.model, restored.engine.module)  # token ids at or above it are bad data
    stream = datasets.open(spec.data, topology, restored.position, micro_batch_size=spec.deepspeed.micro_batch_size,
                           grad_accum_steps=spec.grad_accum_for(topology.world_size), index=data_index,
                           partitions=spec.partitions, vocab_size=vocab,
                           wait_timeout=spec.failure.data_wait_timeout_s)
    startup.info("data open")
    evaluator = Evaluator(spec, topology, vocab_size=vocab) if spec.eval is not None else None
    return Trainer(spec, session, topology, restored=restored, stream=stream, collectives=collectives,
                   metrics=metrics, endpoints=endpoints, watcher=watcher_for(spec, topology), faults=faults,
                   evaluator=evaluator)
