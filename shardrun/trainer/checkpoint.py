"""What a checkpoint holds beyond DeepSpeed's own files: step, counters, data position, RNG states.

Layout of one checkpoint directory:
  shardrun.json            rank 0: step, tokens, world size, DeepSpeed tag (what `latest` means)
  rank_<r>.pt              every rank: train state, data position, its RNG states
  <tag>/...                DeepSpeed's model and (sharded) optimizer states
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shardrun.errors import UserError
from shardrun.trainer import faults
from shardrun.trainer.topology import Topology

MANIFEST = "shardrun.json"


@dataclass(kw_only=True)
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples: int = 0
    """Sequences trained on, all ranks."""
    tokens: int = 0
    """Tokens trained on, all ranks."""


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rank(seed: int, rank: int) -> None:
    """Distinct, reproducible random streams per rank (dropout), same weights init is done before."""
    mixed = seed * 1_000_003 + rank
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def save(engine, directory: str, state: TrainState, data_position: dict, topology: Topology) -> None:
    """Write this rank's part of a checkpoint into directory (every rank calls it)."""
    tag = f"global_step{state.step}"
    engine.save_checkpoint(directory, tag=tag, client_state={"shardrun": asdict(state)})
    faults.maybe_fail("checkpoint-save", step=state.step, rank=topology.rank)
    torch.save(
        {"train": asdict(state), "data": data_position, "rng": rng_state()},
        os.path.join(directory, f"rank_{topology.rank}.pt"),
    )
    if topology.is_main:
        manifest = {**asdict(state), "tag": tag, "world_size": topology.world_size}
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)


def load(engine, directory: str, topology: Topology) -> tuple[TrainState, dict]:
    """Restore engine, counters and this rank's RNG from directory; returns (state, data position)."""
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest["world_size"] != topology.world_size:
        raise UserError(
            f"checkpoint {directory} was written by {manifest['world_size']} workers and this run "
            f"has {topology.world_size}; set scaling.num_workers={manifest['world_size']} to resume"
        )
    path, _ = engine.load_checkpoint(directory, tag=manifest["tag"])
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {manifest['tag']} in {directory}")
    own = torch.load(os.path.join(directory, f"rank_{topology.rank}.pt"), weights_only=False)
    set_rng_state(own["rng"])
    return TrainState(**own["train"]), own["data"]
