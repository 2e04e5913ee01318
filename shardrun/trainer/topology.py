"""Topology: who this process is in the job, computed once; everything else asks it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Topology:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of training processes."""
    local_rank: int
    """Rank among the processes on this node."""
    device: str
    """torch device string: 'cuda:N' or 'cpu'."""

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, use_gpu: bool) -> Topology:
        """From the torch.distributed variables (torchrun and Ray Train set them); 1 rank if none."""
        env = os.environ
        local_rank = int(env.get("LOCAL_RANK", 0))
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("scaling.use_gpu is true but this worker sees no CUDA device")
            # Ray Train narrows CUDA_VISIBLE_DEVICES to this worker's GPU; torchrun does not.
            index = local_rank if torch.cuda.device_count() > local_rank else 0
            device = f"cuda:{index}"
        else:
            device = "cpu"
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=local_rank,
            device=device,
        )
