"""This rank's Prometheus endpoint, and every rank's address for rank 0 to list for discovery."""

from __future__ import annotations

import socket

from shardrun.config import JobSpec
from shardrun.metrics import WorkerMetrics
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.topology import Topology


def start_metrics(spec: JobSpec, topology: Topology, collectives: Collectives) -> tuple[WorkerMetrics | None, list]:
    """The rank's metrics (None when metrics are off) and every rank's {rank, address, node} (empty then)."""
    if not spec.metrics.enabled:
        return None, []
    metrics = WorkerMetrics(spec.metrics, run=spec.name, rank=topology.rank, local_rank=topology.local_rank)
    mine = {"rank": topology.rank, "address": metrics.address, "node": socket.gethostname()}
    return metrics, collectives.gather(mine)
