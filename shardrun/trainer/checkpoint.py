"""Write and load a checkpoint on every rank: DeepSpeed's files, and beside them the step, counters, data
position and RNG states (the layout: shardrun.checkpoint_format).

A checkpoint resumes on another world size (elastic runs, or num_workers changed between
submissions) through DeepSpeed's universal checkpoint: each node converts its copy once
(`ds_to_universal`), and the engine is built with `checkpoint.load_universal`.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from shardrun import checkpoint_format as layout
from shardrun import fs
from shardrun.errors import CheckpointStalled
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.topology import Topology


@dataclass(kw_only=True)
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples: int = 0
    """Sequences trained on, all ranks."""
    tokens: int = 0
    """Tokens trained on, all ranks."""


def rng_state() -> dict:
    """Every RNG's state in plain data and tensors, which torch.load reads with weights_only (no pickle code)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


NUMPY_ARRAY = (np.ndarray, np.dtype, np.dtypes.UInt32DType,
               (getattr(np, "_core", None) or np.core).multiarray._reconstruct)  # numpy 2 moved it to _core
"""What rank files written before their numpy state became a list name: a numpy array, no behaviour."""


def load_rank_file(path: str) -> dict:
    """A rank's file, with weights_only (tensors and plain data only: a planted pickle cannot run)."""
    with torch.serialization.safe_globals(list(NUMPY_ARRAY)):
        return torch.load(path, weights_only=True)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Distinct, reproducible random streams per rank (dropout), same weights init is done before.

    A run that resumes on another world size reseeds every rank from (seed, rank, step)."""
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + step
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def save(engine, directory: str, state: TrainState, data_position: dict, topology: Topology, *,
         zero_stage: int, precision: str, faults: FaultInjector | None = None, eval_loss: float | None = None,
         base_model: dict | None = None) -> None:
    """Write this rank's part of a checkpoint into directory (every rank calls it). base_model: the model's
    frozen weights are a base model's (model.lora; ModelSpec.adapter_base), left out of the checkpoint, which
    records where they come from."""
    engine.save_checkpoint(directory, tag=layout.tag(state.step), client_state={"shardrun": asdict(state)},
                           exclude_frozen_parameters=base_model is not None)
    if faults is not None:
        faults.after_engine_save(step=state.step, rank=topology.rank)
    torch.save(
        {"train": asdict(state), "data": data_position, "rng": rng_state()},
        os.path.join(directory, layout.rank_file(topology.rank)),
    )
    if topology.is_main:
        manifest = layout.manifest(asdict(state), world_size=topology.world_size, zero_stage=zero_stage,
                                   precision=precision, data=data_position, eval_loss=eval_loss,
                                   base_model=base_model)
        fs.write_json(os.path.join(directory, layout.MANIFEST), manifest)


def needs_universal(manifest: dict, topology: Topology) -> bool:
    """A checkpoint from another world size whose optimizer state is sharded by rank (ZeRO 1-3).

    At ZeRO 0 DeepSpeed keeps the whole optimizer state (fp32 master weights included, in bf16 and fp16)
    in the model file, which loads on any world size as it is: it writes no optimizer shards, and the
    universal converter, which looks for them, would fail."""
    return manifest["world_size"] != topology.world_size and manifest.get("zero_stage", 0) != 0


def to_universal(directory: str, manifest: dict, topology: Topology, run_name: str, *, timeout_s: float) -> str:
    """Convert the checkpoint into a node-local universal checkpoint; returns its root folder.

    The first rank of each node converts (`python -m deepspeed.checkpoint.ds_to_universal`) while the
    others wait; every rank then loads from its node's copy. remove_universal cleans it up. A conversion
    that takes longer than timeout_s is stopped (CheckpointStalled)."""
    root = universal_root(run_name, topology)
    if topology.local_rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", os.path.join(directory, manifest["tag"]),
               "--output_folder", os.path.join(root, manifest["tag"]),
               "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            raise CheckpointStalled(f"converting checkpoint {directory} ({manifest['world_size']} workers) for "
                                    f"{topology.world_size} workers took more than failure.checkpoint_timeout_s "
                                    f"({timeout_s:g} s); it was stopped") from None
        if done.returncode != 0:
            raise RuntimeError(f"converting checkpoint {directory} ({manifest['world_size']} workers) for "
                               f"{topology.world_size} workers failed:\n{(done.stdout + done.stderr)[-3000:]}")
    if dist.is_initialized():
        dist.barrier()
    return root


def universal_root(run_name: str, topology: Topology) -> str:
    """The node's folder for the converted copy, named after the node's first rank (ranks of a node are
    consecutive), so that nodes that share a temp folder (one machine, a shared disk) never share it."""
    first = topology.rank - topology.local_rank
    return os.path.join(tempfile.gettempdir(), "shardrun-universal", run_name, f"rank{first}")


def remove_universal(run_name: str, topology: Topology) -> None:
    if dist.is_initialized():
        dist.barrier()
    if topology.local_rank == 0:
        shutil.rmtree(universal_root(run_name, topology), ignore_errors=True)


def load(engine, directory: str, topology: Topology, manifest: dict, *, universal: str | None = None,
         seed: int = 0) -> tuple[TrainState, dict]:
    """Restore engine, counters and this rank's RNG; returns (state, data position).

    universal: the converted copy (to_universal) when the checkpoint's world size differs. Counters
    and data position are global, so any rank's file gives them; with another world size every rank
    is reseeded from (seed, rank, step), as ranks have no counterpart there. A checkpoint of adapters alone
    (its manifest names a base_model) loads into a model whose base weights came from that model."""
    path, _ = engine.load_checkpoint(universal or directory, tag=manifest["tag"],
                                     load_module_strict="base_model" not in manifest)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {manifest['tag']} in {universal or directory}")
    same_world = manifest["world_size"] == topology.world_size
    own = load_rank_file(os.path.join(directory, layout.rank_file(topology.rank if same_world else 0)))
    state = TrainState(**own["train"])
    if same_world:
        set_rng_state(own["rng"])
    else:
        seed_rank(seed, topology.rank, state.step)
    return state, own["data"]
