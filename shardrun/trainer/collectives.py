"""The loop's own collectives beside the training's: a gloo group for the per-step flags, the collective
timeouts (long at start-up and during saves, short once training runs), and gathers of small objects."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from shardrun.config import LONG_TIMEOUT_S  # noqa: F401 - the loop's long timeout, here with its use
from shardrun.trainer.topology import Topology


class Collectives:
    """This rank's view of the process group, for the loop's own small exchanges."""

    def __init__(self, topology: Topology, flag_count: int):
        self.distributed = dist.is_initialized() and topology.world_size > 1
        self.world_size = topology.world_size
        self.control = dist.new_group(backend="gloo") if self.distributed else None
        """A gloo group of its own for the per-step flags: on the host beside NCCL (no device sync), and
        apart from the training's collectives, which their background reduction must not race."""
        self.flags = StepFlags(flag_count, group=self.control)
        self.timeout: float | None = None
        """The collective timeout set by set_timeout; None until then (the group's own at start-up)."""

    def set_timeout(self, seconds: float) -> None:
        """How long a collective may wait for the other ranks before it fails the group: every process group
        this rank is in, the training's, the flags' own and those DeepSpeed made (its clone of the world for
        ZeRO's reductions keeps the backend's default otherwise, NCCL's 10 minutes)."""
        if self.distributed:
            for group in all_groups():
                distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
        self.timeout = seconds

    @contextlib.contextmanager
    def long_timeout(self) -> Iterator[None]:
        """The long timeout inside the block (ranks wait at barriers for the slowest checkpoint writer)."""
        short = self.timeout
        if short is not None:
            self.set_timeout(LONG_TIMEOUT_S)
        try:
            yield
        finally:
            if short is not None:
                self.set_timeout(short)

    def gather(self, mine: object) -> list:
        """Every rank's object, in rank order, over the control group (the object alone without a group)."""
        if not self.distributed:
            return [mine]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.control)
        return everyone

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over all ranks, on the training's group (its device)."""
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world_size
        return value


def all_groups() -> list:
    """Every process group of this process that it is a member of (torch's registry of them)."""
    return [group for group in list(distributed_c10d._world.pg_map)
            if not distributed_c10d._rank_not_in_group(group)]


class StepFlags:
    """Flags that are true on every rank once they are true on any rank, reduced one step behind.

    Each step every rank calls exchange() with its own flags: it starts their all-reduce (MAX) in the
    background and returns the result of the previous step's. The reduction runs while the next step
    trains, so no rank waits at a step boundary for the slowest one (bench/overhead.py --profile shows
    what a blocking one costs); a flag takes effect one step later.
    Every rank sees the same result at the same step.

    `group` must be a gloo group of its own (the worker loop makes one), so that the tensor stays on the
    host and the background reduction never races the training's collectives. Without a process group
    of 2 or more ranks, exchange() returns the flags it is given.
    """

    def __init__(self, count: int, group: dist.ProcessGroup | None = None):
        self.count = count
        self.group = group
        self._pending: tuple | None = None

    @staticmethod
    def distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def exchange(self, flags: list[bool]) -> list[bool]:
        """Start reducing this step's flags; return the previous step's, reduced (all false at first)."""
        if len(flags) != self.count:
            raise ValueError(f"{len(flags)} flags given, {self.count} expected")
        if not self.distributed():
            return list(flags)
        result = self.settle()
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self._pending = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True), tensor)
        return result

    def settle(self) -> list[bool]:
        """Wait for the reduction in flight, if any, and return it (all false without one)."""
        if self._pending is None:
            return [False] * self.count
        work, tensor = self._pending
        self._pending = None
        work.wait()
        return [bool(v) for v in tensor.tolist()]
