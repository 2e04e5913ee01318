"""Memory a training run needs per rank, as ZeRO accounts it, against the memory a GPU has: the driver's
checks print it before any cluster resource, and a run whose share cannot fit its GPU is refused with the
numbers (on the driver when the GPU is on its machine, on the workers before the optimizer state is made)."""

from __future__ import annotations

import shutil
import subprocess

from shardrun.config import JobSpec
from shardrun.errors import UserError

GIB = 1024**3


def state_bytes(params: int, *, stage: int, precision: str, world: int, trained: int | None = None
                ) -> dict[str, float]:
    """Bytes of weights, gradients and Adam's state one rank holds (ZeRO's accounting, activations aside): in
    bf16/fp16 2 + 2 bytes of weights and gradients and 12 of fp32 master weights and moments per trained
    parameter, in fp32 4 + 4 and 8; ZeRO 1 shards the optimizer state, 2 the gradients too, 3 the weights too.
    trained: the parameters that train (LoRA: the adapters; default all); frozen ones hold weights alone."""
    trained = params if trained is None else trained
    low = precision != "fp32"
    return {"weights": params * (2 if low else 4) / (world if stage == 3 else 1),
            "gradients": trained * (2 if low else 4) / (world if stage >= 2 else 1),
            "optimizer": trained * (12 if low else 8) / (world if stage >= 1 else 1)}


def state_bytes_per_rank(params: int, *, stage: int, precision: str, world: int, trained: int | None = None
                         ) -> float:
    """The sum of state_bytes."""
    return sum(state_bytes(params, stage=stage, precision=precision, world=world, trained=trained).values())


def check_fits(params: int, device_bytes: int | None, *, spec: JobSpec, world: int, where: str,
               trained: int | None = None) -> None:
    """UserError when one rank's share of weights, gradients and optimizer state alone is more than its GPU holds
    (activations and the framework's own buffers come on top, so such a run fails for certain), with the levers
    that shrink the share."""
    d = spec.deepspeed
    need = state_bytes_per_rank(params, stage=d.zero_stage, precision=d.precision, world=world, trained=trained)
    if device_bytes is None or need <= device_bytes:
        return
    levers = [f"deepspeed.zero_stage: {d.zero_stage + 1}" if d.zero_stage < 3 else None,
              "deepspeed.precision: bf16" if d.precision == "fp32" else None,
              "more workers" if d.zero_stage else None,
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
    """`3.75 GiB`, `412.0 MiB`."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 1024**2:,.1f} MiB"
