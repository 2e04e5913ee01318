"""Prometheus metrics: every rank serves its own series, the driver serves the job's, file_sd finds them.

Names are `shardrun_*` in base units (docs/metrics.md lists them). Worker series carry the labels
run, rank and node; driver series carry run. Each process has its own registry, so a restarted
worker starts its counters at zero and Prometheus's rate() sees a reset, as it should.
"""

from __future__ import annotations

import math
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from shardrun.config import MetricsSpec

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
JOB_STATES = ("pending", "running", "restarting", "succeeded", "stopped", "failed")

# No `*_created` series beside every counter and histogram: twice the series for a timestamp
# Prometheus does not need (rate() finds resets itself).
disable_created_metrics()


class Endpoint:
    """An HTTP /metrics server for one registry; `address` is what Prometheus should scrape."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        host = bind_host(host, cluster=False)  # launchers say when it is a cluster; unsaid, loopback
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.server.server_port
        self.address = f"{advertised_host(host)}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def bind_host(setting: str, *, cluster: bool) -> str:
    """metrics.host as an address: auto is every interface on a cluster (Prometheus scrapes from another
    node) and loopback on a machine alone."""
    if setting != "auto":
        return setting
    return "0.0.0.0" if cluster else "127.0.0.1"


def advertised_host(host: str) -> str:
    """The address other nodes reach a server bound to host at (0.0.0.0: this node's IP)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not on Ray: fall back to the hostname's address
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def device_memory(device: str) -> tuple[int, int, int] | None:
    """(allocated, reserved, peak allocated since the start) bytes of a CUDA device; None elsewhere."""
    if not device.startswith("cuda"):
        return None
    import torch

    return (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device),
            torch.cuda.max_memory_allocated(device))


class WorkerMetrics:
    """One rank's series. Updated by the loop each step (cheap: no device sync) and at log steps."""

    def __init__(self, spec: MetricsSpec, *, run: str, rank: int, local_rank: int):
        self.registry = CollectorRegistry()
        labels = {"run": run, "rank": str(rank), "node": socket.gethostname()}
        names = list(labels)
        r = self.registry

        def counter(name, doc):
            return Counter(name, doc, names, registry=r).labels(**labels)

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def optional_gauge(name, doc):
            """Absent until first set (MFU on CPU, loss scale outside fp16): not a misleading 0."""
            family = Gauge(name, doc, names, registry=r)
            return _Lazy(lambda: family.labels(**labels))

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**labels)

        self.tokens = counter("shardrun_tokens", "Tokens this rank trained on.")
        self.samples = counter("shardrun_samples", "Samples this rank trained on.")
        self.steps = counter("shardrun_steps", "Optimizer steps done by this worker process.")
        self.skipped_steps = counter("shardrun_skipped_steps", "Steps skipped for a non-finite loss or gradient.")
        self.skipped_files = counter("shardrun_data_skipped_files", "Bad data files left out (data.on_bad_file: skip).")
        self.skipped_row_groups = counter("shardrun_data_skipped_row_groups", "Bad row groups skipped as padding.")
        self.loss = gauge("shardrun_loss", "Mean training loss over the last log window, all ranks.")
        self.lr = gauge("shardrun_learning_rate", "Learning rate.")
        self.eval_loss = optional_gauge("shardrun_eval_loss", "Mean loss on the held-out data (eval), all ranks.")
        self.grad_norm = optional_gauge("shardrun_grad_norm", "Global gradient norm before clipping.")
        self.loss_scale = optional_gauge("shardrun_loss_scale", "fp16 dynamic loss scale.")
        self.mfu = optional_gauge("shardrun_mfu_ratio", "Model FLOPs utilisation of this rank's device, 0 to 1.")
        self.mem_allocated = optional_gauge("shardrun_device_memory_allocated_bytes", "Device memory held by tensors.")
        self.mem_reserved = optional_gauge("shardrun_device_memory_reserved_bytes",
                                           "Device memory reserved by the allocator.")
        self.mem_peak = optional_gauge("shardrun_device_memory_peak_bytes",
                                       "Most device memory held by tensors at once since the worker started.")
        self.world_size = gauge("shardrun_world_size", "Ranks in the worker group.")
        self.queue_depth = gauge("shardrun_data_queue_depth", "Steps of batches decoded ahead.")
        self.buffered = gauge("shardrun_data_buffered_bytes", "Bytes of decoded data held by the stream.")
        self.step = gauge("shardrun_step", "The last optimizer step done.")
        self.step_time = histogram("shardrun_step_duration_seconds", "Time of one optimizer step, data wait included.",
                                   STEP_BUCKETS)
        self.data_wait = histogram("shardrun_data_wait_seconds", "Time a step waited for its batches.", WAIT_BUCKETS)
        self.save_time = histogram("shardrun_checkpoint_save_seconds", "Time to save a checkpoint.",
                                   CHECKPOINT_BUCKETS)
        self.load_time = histogram("shardrun_checkpoint_load_seconds", "Time to load a checkpoint.",
                                   CHECKPOINT_BUCKETS)
        port = spec.port + local_rank if spec.port else 0
        self.endpoint = Endpoint(self.registry, spec.host, port)
        self._skipped = {"files": 0, "row_groups": 0}

    @property
    def address(self) -> str:
        return self.endpoint.address

    def step_done(self, *, step: int, seconds: float, data_wait: float, samples: int, tokens: int) -> None:
        self.steps.inc()
        self.step.set(step)
        self.step_time.observe(seconds)
        self.data_wait.observe(data_wait)
        self.samples.inc(samples)
        self.tokens.inc(tokens)

    def logged(self, *, loss: float, lr: float, grad_norm: float | None, loss_scale: float | None,
               mfu: float | None, skipped_steps: int, data: dict, world_size: int, memory: tuple | None) -> None:
        """The numbers known at a log step (the loss is synced there, not every step)."""
        self.loss.set(loss)
        self.lr.set(lr)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norm.set(grad_norm)
        if loss_scale is not None:
            self.loss_scale.set(loss_scale)
        if mfu is not None:
            self.mfu.set(mfu)
        if skipped_steps:
            self.skipped_steps.inc(skipped_steps)
        self.world_size.set(world_size)
        self.queue_depth.set(data["queue_depth"])
        self.buffered.set(data["buffered_bytes"])
        for key, counter in (("files", self.skipped_files), ("row_groups", self.skipped_row_groups)):
            new = data[f"skipped_{key}"] - self._skipped[key]
            if new > 0:
                counter.inc(new)
                self._skipped[key] += new
        if memory is not None:
            self.mem_allocated.set(memory[0])
            self.mem_reserved.set(memory[1])
            self.mem_peak.set(memory[2])

    def evaluated(self, loss: float) -> None:
        if math.isfinite(loss):
            self.eval_loss.set(loss)

    def checkpoint_saved(self, seconds: float) -> None:
        self.save_time.observe(seconds)

    def checkpoint_loaded(self, seconds: float) -> None:
        self.load_time.observe(seconds)

    def close(self) -> None:
        self.endpoint.close()


class _Lazy:
    """A labelled child made on first use."""

    def __init__(self, make):
        self._make = make
        self._child = None

    def set(self, value: float) -> None:
        if self._child is None:
            self._child = self._make()
        self._child.set(value)


class JobMetrics:
    """The driver's series: job state, restarts, worker group size."""

    def __init__(self, spec: MetricsSpec, *, run: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.state = Gauge("shardrun_job_state", "1 for the job's current state.", ["run", "state"], registry=r)
        self.restarts = Counter("shardrun_job_restarts", "Worker group restarts from a checkpoint.", ["run"],
                                registry=r).labels(run=run)
        self.workers = Gauge("shardrun_job_workers", "Workers in the current worker group.", ["run"],
                             registry=r).labels(run=run)
        self.run = run
        self._lock = threading.Lock()
        self.set_state("pending")
        self.endpoint = Endpoint(self.registry, spec.host, 0)
        self.started_at = time.time()

    @property
    def address(self) -> str:
        return self.endpoint.address

    def set_state(self, state: str) -> None:
        with self._lock:
            for s in JOB_STATES:
                self.state.labels(run=self.run, state=s).set(1 if s == state else 0)

    def group_started(self, world_size: int, restart: bool) -> None:
        if restart:
            self.restarts.inc()
        self.workers.set(world_size)
        self.set_state("running")

    def close(self) -> None:
        self.endpoint.close()
