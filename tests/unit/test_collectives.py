"""The loop's collective timeout reaches every process group, DeepSpeed's own among them (its clone of the world
group carries ZeRO's reductions and would keep the backend's default: NCCL's 10 minutes, gloo's 30)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardrun.net import free_port
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.control import FLAGS
from shardrun.trainer.topology import Topology

pytestmark = pytest.mark.timeout(120)


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        collectives = Collectives(Topology(rank=rank, world_size=2, local_rank=rank, device="cpu"), FLAGS)
        zero = dist.new_group(ranks=[0, 1])  # as DeepSpeed clones the world group at initialize
        collectives.set_timeout(7)
        cpu = torch.device("cpu")
        groups = {"world": dist.group.WORLD, "flags": collectives.control, "deepspeed": zero}
        out[rank] = {name: g._get_backend(cpu).options._timeout for name, g in groups.items()}
    finally:
        dist.destroy_process_group()


def test_the_collective_timeout_reaches_every_group_deepspeeds_too():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), out), nprocs=2, join=True)
        seen = dict(out)
    seven = datetime.timedelta(seconds=7)
    assert seen == {r: {"world": seven, "flags": seven, "deepspeed": seven} for r in (0, 1)}
