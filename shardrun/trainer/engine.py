"""The DeepSpeed engine for a model and a spec. The only module that imports deepspeed."""

from __future__ import annotations

import logging
import os
import warnings

import torch

from shardrun.trainer import extensions

if not torch.cuda.is_available():
    # Must be set before deepspeed is imported: it picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU shared-memory comm op on first use: where, and with which ninja.
extensions.prepare()

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from shardrun.config import JobSpec  # noqa: E402
from shardrun.net import free_port  # noqa: E402
from shardrun.trainer.ds_config import build_ds_config  # noqa: E402
from shardrun.trainer.topology import Topology  # noqa: E402

DeepSpeedEngine = deepspeed.DeepSpeedEngine
if os.environ.get("DS_ACCELERATOR") == "cpu" and not extensions.can_have_shm_op():
    # a machine without a C++ compiler: DeepSpeed's CPU collectives go through gloo alone
    deepspeed.ops.__compatible_ops__[extensions.SHM_OP] = False


class _DropKnownNoise(logging.Filter):
    """DeepSpeed warns at every start that the LR scheduler has not stepped yet; it is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


deepspeed.utils.logger.addFilter(_DropKnownNoise())
# DeepSpeed's ZeRO calls torch collectives under their deprecated names, once per step.
warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning)


def init_distributed(topology: Topology) -> None:
    """Join the process group (Ray Train may have made it already); one process needs none."""
    if topology.device.startswith("cuda"):
        torch.cuda.set_device(topology.device)
    if not dist.is_initialized() and topology.world_size == 1:
        # A lone process still needs a (trivial) process group for DeepSpeed.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if topology.device.startswith("cuda") else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def ds_config(spec: JobSpec, topology: Topology, *, load_universal: bool = False,
              model_params: int | None = None) -> dict:
    """The DeepSpeed config of this rank: the spec's, with this world size's gradient accumulation."""
    return build_ds_config(
        spec.deepspeed, max_steps=spec.run.max_steps, on_gpu=topology.device != "cpu",
        grad_accum_steps=spec.grad_accum_for(topology.world_size), load_universal=load_universal,
        model_params=model_params,
    )


def build(model: torch.nn.Module, spec: JobSpec, topology: Topology, *,
          load_universal: bool = False) -> DeepSpeedEngine:
    """deepspeed.initialize with the spec's ZeRO stage, precision, optimizer and LR schedule, and the
    gradient accumulation of this world size; with model.compile, the engine compiles its module
    (engine.compile(): torch.compile's default backend, inductor, on the module in place, so that checkpoints keep
    the module's own names)."""
    init_distributed(topology)
    accelerator = deepspeed.accelerator.get_accelerator().device_name()
    if accelerator != torch.device(topology.device).type:
        raise RuntimeError(f"DeepSpeed's accelerator is {accelerator} but this rank trains on {topology.device}: "
                           "set DS_ACCELERATOR to match scaling.use_gpu (or unset it)")
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen weights (LoRA's base) get no optimizer state
    config = ds_config(spec, topology, load_universal=load_universal,
                       model_params=sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in trained))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=config)
    if spec.model.compile:
        engine.compile()
    return engine


def module_dtype(precision: str) -> torch.dtype | None:
    """The dtype DeepSpeed casts the module to for deepspeed.precision (None: fp32, the module as it is)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def as_module_dtype(batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating columns in the dtype DeepSpeed cast the module to (bf16, fp16; module_dtype): it casts positional
    inputs only, and a float32 column meeting bf16 weights fails."""
    if dtype is None:
        return batch
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def precision_advice(device: str, precision: str, capability: tuple[int, int] | None) -> str | None:
    """A line for a run in fp32 on a GPU with bf16 tensor cores (compute capability 8.0 and up: A100, H100):
    fp32 matmuls there run at a fraction of bf16's rate (H100: 67 against 989 TFLOP/s), while the MFU,
    counted against the fp32 peak, looks normal."""
    if not device.startswith("cuda") or precision != "fp32" or capability is None or capability[0] < 8:
        return None
    return (f"training in fp32 on a GPU with bf16 tensor cores (compute capability {capability[0]}.{capability[1]}): "
            "set deepspeed.precision: bf16 for several times the throughput (MFU is counted against the fp32 peak)")


def skipped_steps(engine: DeepSpeedEngine) -> int:
    """Updates DeepSpeed left out (gradients not finite, or fp16's loss scaler backing off): a host counter."""
    return int(getattr(engine, "skipped_steps", 0) or 0)


def loss_scale(engine: DeepSpeedEngine, precision: str) -> float | None:
    """fp16's current loss scale; None in other precisions. ZeRO's optimizers name it cur_scale and
    loss_scale, ZeRO 0's FP16_Optimizer loss_scale alone."""
    if precision != "fp16":
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else getattr(engine.optimizer, "cur_scale", None)

