"""Memory a training run needs per rank, as ZeRO accounts it, against the memory a GPU has: the driver's
checks print it before any cluster resource, and a run whose share cannot fit its GPU is refused with the
numbers (on the driver when the GPU is on its machine, on the workers before the optimizer state is made)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from shardrun.config import JobSpec
from shardrun.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its parameters (all, those that train, the largest module's own) and,
    for its activations, its transformer's sizes."""

    params: int
    trained: int
    largest_layer: int = 0
    """The parameters of the largest module: ZeRO-3 gathers one module's weights at a time."""
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    vocab: int = 0
    """The logits' width (a classifier's: its labels)."""
    eager_attention: bool = False
    """The attention probabilities are kept (a x s x s per sequence); SDPA's and flash attention's are not."""


def model_states(shape: ModelShape, *, stage: int, precision: str, world: int, offload_optimizer: bool = False,
                 offload_params: bool = False) -> dict[str, float]:
    """Bytes one rank holds of weights, gradients and optimizer state (on its device), and what offload moves to
    host memory ("host"), as DeepSpeed's estimators account them (estimate_zero2/zero3_model_states_mem_needs).

    bf16/fp16, per trained parameter: 2 bytes of 16-bit weights (every parameter: frozen ones hold these alone),
    4 of fp32 master weights, 2 of 16-bit gradients (not kept at ZeRO 3, which reduces into fp32 ones), 4 of fp32
    gradients and 8 of Adam's moments; fp32: 4 of weights, 4 of gradients, 8 of moments. ZeRO 1 shards the fp32
    state over the ranks, 2 the 16-bit gradients too, 3 the weights too, and gathers one module's weights at a time
    (4 bytes per parameter of the largest). Offloading the optimizer moves the fp32 state to host memory; ZeRO 3's
    weights offload leaves the device the gathered module alone."""
    P, T, n = shape.params, shape.trained, world
    low = precision != "fp32"
    shard = n if stage >= 1 else 1
    weights = (2 if low else 4) * P / (n if stage == 3 else 1)
    master = 4 * T / shard if low else 0.0
    grads16 = 0.0 if stage == 3 and low else (2 if low else 4) * T / (n if stage >= 2 else 1)
    grads32 = 4 * T / shard if low else 0.0
    moments = 8 * T / shard
    gathered = 4 * shape.largest_layer if stage == 3 else 0.0
    out = {"weights": weights + master + gathered, "gradients": grads16 + grads32, "optimizer": moments, "host": 0.0}
    if offload_optimizer:  # the fp32 state and the gradients in host memory; the device keeps the weights
        out = {"weights": weights + gathered, "gradients": 0.0, "optimizer": 0.0,
               "host": master + grads32 + moments + (0.0 if low else grads16)}
    if offload_params:  # and the weights, but for the module being gathered
        out = {"weights": gathered, "gradients": 0.0, "optimizer": 0.0, "host": out["host"] + weights}
    return out


def activation_bytes(shape: ModelShape, *, precision: str, micro_batch: int, seq_len: int,
                     checkpoint_every: int = 0) -> float:
    """Bytes of activations kept for the backward pass of one micro-batch, by the usual per-layer formula
    (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022): 34 s b h bytes per
    layer in 16-bit with a 4h MLP (15 s b h of it outside the MLP, the MLP's scaled to the model's intermediate
    size), plus 5 a s^2 b where attention keeps its probabilities (eager); double in fp32. A checkpointed layer
    keeps its input alone (s b h values) and one layer's are recomputed at a time. The logits and their fp32 copy
    for the loss come on top (s b V)."""
    if not shape.layers or not shape.hidden:
        return 0.0
    unit = 2 if precision != "fp32" else 4
    s, b, h = seq_len, micro_batch, shape.hidden
    mlp = 19 * (shape.intermediate or 4 * h) / 4
    full = s * b * (15 * h + mlp) * unit / 2 + (5 * shape.heads * s * s * b * unit / 2 if shape.eager_attention else 0)
    checkpointed = -(-shape.layers // checkpoint_every) if checkpoint_every else 0
    layers = checkpointed * s * b * h * unit + (shape.layers - checkpointed) * full + (full if checkpointed else 0)
    return layers + s * b * shape.vocab * (unit + 4)


def state_bytes_per_rank(params: int, *, stage: int, precision: str, world: int, trained: int | None = None
                         ) -> float:
    """Weights, gradients and optimizer state on one rank's device (model_states, no offload, largest module
    aside)."""
    shape = ModelShape(params=params, trained=params if trained is None else trained)
    return on_device(model_states(shape, stage=stage, precision=precision, world=world))


def spec_states(shape: ModelShape, spec: JobSpec, world: int) -> dict[str, float]:
    """model_states at the spec's ZeRO stage and precision, offloaded as deepspeed.offload asks."""
    d = spec.deepspeed
    return model_states(shape, stage=d.zero_stage, precision=d.precision, world=world,
                        offload_optimizer=d.offload.optimizer != "none", offload_params=d.offload.params != "none")


def on_device(states: dict[str, float]) -> float:
    """What of model_states a rank's device holds: its weights, gradients and optimizer state."""
    return states["weights"] + states["gradients"] + states["optimizer"]


def estimate(shape: ModelShape, spec: JobSpec, world: int, seq_len: int | None = None) -> dict[str, float]:
    """The memory per rank the spec's run takes: model_states (offload as the spec asks) and activation_bytes
    (micro batch, sequence length: seq_len, else data.seq_len; activation checkpointing); "device" is what its GPU
    holds of them."""
    d = spec.deepspeed
    out = spec_states(shape, spec, world)
    out["activations"] = activation_bytes(shape, precision=d.precision, micro_batch=d.micro_batch_size,
                                          seq_len=seq_len or spec.data.seq_len or 1,
                                          checkpoint_every=spec.model.checkpoint_every)
    out["device"] = on_device(out) + out["activations"]
    return out


def estimate_line(shape: ModelShape, spec: JobSpec, world: int, device_bytes: int | None = None,
                  where: str = "this machine's GPU", seq_len: int | None = None) -> str:
    """The estimate in one line: each part, the total per GPU (or CPU rank), host memory taken by offload, the
    device's memory when known."""
    e = estimate(shape, spec, world, seq_len)
    seq_len = seq_len or spec.data.seq_len
    d, every = spec.deepspeed, spec.model.checkpoint_every
    what = "GPU" if spec.scaling.use_gpu else "rank"
    recompute = ("no activation checkpointing" if not every else "activation checkpointing every layer" if every == 1
                 else f"activation checkpointing every {every} layers")
    parts = ", ".join(f"{name} {bytes_text(e[key])}" for name, key in (
        ("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
        ("activations", "activations")))
    line = (f"memory per {what} (estimate): {parts} (micro batch {d.micro_batch_size} x {seq_len or '?'} "
            f"tokens, {recompute}): {bytes_text(e['device'])} at ZeRO {d.zero_stage} in {d.precision} on {world} "
            f"{'worker' if world == 1 else 'workers'}")
    if e["host"]:
        line += f"; {bytes_text(e['host'])} more in host memory per rank (offloaded)"
    if device_bytes:
        verdict = "fits" if e["device"] <= device_bytes * 0.9 else "does not fit" if e["device"] > device_bytes \
            else "is tight in"
        line += f"; it {verdict} {where} ({bytes_text(device_bytes)})"
    return line


def check_fits(params: int, device_bytes: int | None, *, spec: JobSpec, world: int, where: str,
               trained: int | None = None, need: float | None = None) -> None:
    """UserError when one rank's share of weights, gradients and optimizer state alone (need; default
    state_bytes_per_rank's) is more than its GPU holds (activations and the framework's own buffers come on top, so
    such a run fails for certain), with the levers that shrink the share."""
    d = spec.deepspeed
    if need is None:
        need = state_bytes_per_rank(params, stage=d.zero_stage, precision=d.precision, world=world, trained=trained)
    if device_bytes is None or need <= device_bytes:
        return
    levers = [f"deepspeed.zero_stage: {d.zero_stage + 1}" if d.zero_stage < 3 else None,
              "deepspeed.precision: bf16" if d.precision == "fp32" else None,
              "more workers" if d.zero_stage else None,
              "deepspeed.offload.optimizer: cpu" if d.zero_stage and d.offload.optimizer == "none" else None,
              "deepspeed.offload.params: cpu" if d.zero_stage == 3 and d.offload.params == "none" else None,
              "model.lora (adapters train, the base weights stay frozen)"
              if spec.model.hf is not None and spec.model.lora is None else None]
    raise UserError(f"model: {count_text(params)} parameters need about {bytes_text(need)} per rank for weights, "
                    f"gradients and optimizer state at ZeRO {d.zero_stage} in {d.precision} on {world} "
                    f"{'worker' if world == 1 else 'workers'}, more than {where} holds ({bytes_text(device_bytes)}); "
                    f"try {', '.join(x for x in levers if x)}")


def gpu_memory() -> int | None:
    """Bytes of memory of this machine's first GPU, from nvidia-smi (no CUDA context made in this process, which
    would hold memory on the GPU the run trains on); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return int(out.split()[0]) * 1024**2
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def count_text(n: int) -> str:
    """`1.24 B`, `124.4 M`, `34,976`."""
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n:,}"


def bytes_text(n: float) -> str:
    """`3.75 GiB`, `412.0 MiB`, `96.5 KiB`."""
    if n >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / 1024**2:,.1f} MiB" if n >= 1024**2 or n == 0 else f"{n / 1024:,.1f} KiB"
