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
    def from_env(cls, use_gpu: bool, *, device: str | None = None) -> Topology:
        """From the torch.distributed variables (torchrun and Ray Train set them); 1 rank if none.

        device: the one the launcher chose for this worker (Ray Train's get_device()), else see pick_device."""
        env = os.environ
        local_rank = int(env.get("LOCAL_RANK", 0))
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("scaling.use_gpu is true but this worker sees no CUDA device")
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=local_rank,
            device=pick_device(use_gpu, local_rank=local_rank, visible=torch.cuda.device_count() if use_gpu else 0,
                               given=device),
        )


def pick_device(use_gpu: bool, *, local_rank: int, visible: int, given: str | None = None) -> str:
    """This worker's torch device. Ray Train shows every worker of a node the node's GPUs (for NCCL's
    peer-to-peer paths) and chooses each worker's own: `given`, which wins. torchrun shows every process all
    GPUs: the local rank's. One visible GPU (CUDA_VISIBLE_DEVICES narrowed by hand): that one."""
    if not use_gpu:
        return "cpu"
    if given is not None:
        return given
    return f"cuda:{local_rank if visible > local_rank else 0}"
