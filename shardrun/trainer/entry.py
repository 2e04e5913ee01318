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
from shardrun.trainer import engine as engines
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.control import FLAGS, watcher_for
from shardrun.trainer.endpoints import start_metrics
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
    trainer = build(spec, session, topology or Topology.from_env(spec.scaling.use_gpu), data_index=data_index,
                    faults=faults or FaultInjector())
    try:
        trainer.train()
    except RuntimeError as e:
        timeout = trainer.collectives.timeout
        if timeout is None or "timed out" not in str(e).lower():
            raise
        raise RuntimeError(f"rank {trainer.topology.rank} waited more than failure.collective_timeout_s "
                           f"({timeout:g} s) at step {trainer.state.step} for another rank, which died or hangs: "
                           f"{e}") from e
    finally:
        trainer.close()
    return trainer.state


def build(spec: JobSpec, session: Session, topology: Topology, *, data_index: dict | None,
          faults: FaultInjector) -> Trainer:
    """Join the process group, start this rank's metrics, restore the engine, open the data at its position."""
    engines.init_distributed(topology)
    collectives = Collectives(topology, FLAGS)
    metrics, endpoints = start_metrics(spec, topology, collectives)
    restored = restore(spec, session.store, topology, metrics)
    startup.info("engine ready", extra={"engine": restored.engine})
    vocab = spec.model.vocab_size if spec.model.type == "gpt" else None  # an entrypoint model's is its own
    stream = datasets.open(spec.data, topology, restored.position, micro_batch_size=spec.deepspeed.micro_batch_size,
                           grad_accum_steps=spec.grad_accum_for(topology.world_size), index=data_index,
                           partitions=spec.partitions, vocab_size=vocab,
                           wait_timeout=spec.failure.data_wait_timeout_s)
    startup.info("data open")
    return Trainer(spec, session, topology, restored=restored, stream=stream, collectives=collectives,
                   metrics=metrics, endpoints=endpoints, watcher=watcher_for(spec, topology), faults=faults)
