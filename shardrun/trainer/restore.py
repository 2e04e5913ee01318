"""Build the engine and load the latest checkpoint into it, converted if another world size wrote it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from shardrun import checkpoint_format as layout
from shardrun import memory
from shardrun.config import JobSpec
from shardrun.errors import UserError
from shardrun.metrics import WorkerMetrics, flops
from shardrun.trainer import checkpoint, engine, models
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.session import CheckpointStore
from shardrun.trainer.topology import Topology


@dataclass(kw_only=True)
class Restored:
    engine: engine.DeepSpeedEngine
    flops_per_token: float
    """Counted on the whole model: ZeRO-3 leaves each rank only a shard of the parameters."""
    state: TrainState = field(default_factory=TrainState)
    position: dict | None = None
    """The data position to resume from; None: a new run."""
    resized_from: int | None = None
    """The world size that wrote the checkpoint this group resumed from, when it was another."""
    universal: bool = False
    """That checkpoint went through DeepSpeed's universal format."""


def restore(spec: JobSpec, store: CheckpointStore, topology: Topology,
            metrics: WorkerMetrics | None = None) -> Restored:
    """The engine, from the store's latest checkpoint if there is one (every rank calls it)."""
    with store.latest_checkpoint() as path:
        if path is None:
            restored = _build(spec, topology)
            checkpoint.seed_rank(spec.run.seed, topology.rank)
            return restored
        t0 = time.perf_counter()
        manifest = layout.read_manifest(path)
        why = layout.base_model_mismatch(manifest.get("base_model"), spec.model.adapter_base, manifest["step"])
        if why:
            raise UserError(f"resuming {spec.name}: {why}")
        universal = None
        if checkpoint.needs_universal(manifest, topology):
            universal = checkpoint.to_universal(path, manifest, topology, spec.name,
                                                timeout_s=spec.failure.checkpoint_timeout_s)
        try:
            restored = _build(spec, topology, load_universal=universal is not None)
            restored.state, restored.position = checkpoint.load(restored.engine, path, topology, manifest,
                                                                universal=universal, seed=spec.run.seed)
        finally:
            if universal is not None:
                checkpoint.remove_universal(spec.name, topology)
        if manifest["world_size"] != topology.world_size:
            restored.resized_from = manifest["world_size"]
        restored.universal = universal is not None
        if metrics is not None:
            metrics.checkpoint_loaded(time.perf_counter() - t0)
        return restored


def _build(spec: JobSpec, topology: Topology, *, load_universal: bool = False) -> Restored:
    torch.manual_seed(spec.run.seed)  # every rank builds the same initial weights
    if spec.model.hf is None:
        model = models.build(spec.model)
        model.train()  # whatever mode a factory left it in: dropout and checkpointing act in training mode
        models.enable_checkpointing(model, spec.model)
        per_token = flops.flops_per_token(model, spec.data.seq_len or 1)
        return Restored(engine=engine.build(model, spec, topology, load_universal=load_universal),
                        flops_per_token=per_token)
    from shardrun.trainer.models import hf

    folder = hf.local_folder(spec.model.hf, local_rank=topology.local_rank)
    # ZeRO-3: each rank makes and loads only its shard of the weights
    zero3 = spec.deepspeed.zero_stage == 3
    with hf.zero3_loading(engine.ds_config(spec, topology, load_universal=load_universal)) if zero3 \
            else contextlib.nullcontext():
        model = hf.build(spec.model.hf, folder, spec.model.lora)
        model.train()  # from_pretrained leaves the model in eval mode: no dropout, and no activation checkpointing
        models.enable_checkpointing(model, spec.model)
        fits_device(model, spec, topology)
        per_token = flops.flops_per_token(model, spec.data.seq_len or 1)
        built = engine.build(model, spec, topology, load_universal=load_universal)
    return Restored(engine=built, flops_per_token=per_token)


def fits_device(model: torch.nn.Module, spec: JobSpec, topology: Topology) -> None:
    """UserError (never retried) when this rank's share of weights, gradients and optimizer state is more than
    its GPU holds: checked before DeepSpeed makes the optimizer state, where it would run out of memory."""
    if not topology.device.startswith("cuda"):
        return
    params = trained = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        params += n
        trained += n if p.requires_grad else 0
    states = memory.spec_states(memory.ModelShape(params=params, trained=trained), spec, topology.world_size)
    memory.check_fits(params, torch.cuda.mem_get_info(topology.device)[1], spec=spec, world=topology.world_size,
                      where=f"rank {topology.rank}'s GPU ({torch.cuda.get_device_name(topology.device)})",
                      need=memory.on_device(states))
