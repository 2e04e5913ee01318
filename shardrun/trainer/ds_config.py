"""The DeepSpeed config a spec asks for, as a plain dict (no deepspeed import: testable alone)."""

from __future__ import annotations

import copy
from typing import Any

from shardrun.config import DeepSpeedSpec

MIN_BUCKET, MAX_BUCKET = 10_000_000, 500_000_000
"""Gradient bucket sizes (elements) when communication overlaps backward: DeepSpeed's default is the maximum,
one bucket for any model below 500 M parameters, which leaves nothing to overlap."""


def build_ds_config(spec: DeepSpeedSpec, *, max_steps: int, on_gpu: bool, grad_accum_steps: int | None = None,
                    load_universal: bool = False, model_params: int | None = None) -> dict[str, Any]:
    """shardrun's DeepSpeed config, with spec.config merged over it last.

    grad_accum_steps: this world size's (elastic runs keep the global batch); load_universal: the
    checkpoint to load was converted for another world size; model_params: the model's parameter count (the
    buckets of overlapped communication are sized from it)."""
    opt = spec.optimizer
    accum = grad_accum_steps or spec.grad_accum_steps
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage, **_overlap(spec, on_gpu, model_params)},
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16"},
        "optimizer": {
            "type": "AdamW" if opt.type == "adamw" else "Adam",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay if opt.type == "adamw" else 0.0,
                # DeepSpeed's own Adam (FusedAdam, CPU Adam) is compiled on first use: with no nvcc on a GPU
                # image, deepspeed.initialize fails on every rank. torch's compiles nothing.
                "torch_adam": opt.implementation == "torch",
                **({"fused": True} if opt.implementation == "torch" and on_gpu else {}),
            },
        },
        "scheduler": _scheduler(spec, max_steps),
        "steps_per_print": 10**9,  # shardrun prints progress itself
        "wall_clock_breakdown": False,
    }
    config["zero_optimization"].update(offload(spec, on_gpu))
    if spec.offload.on and opt.implementation == "torch":
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the offloaded state on the host
    if reduce_in_fp32(spec, accum):
        config["communication_data_type"] = "fp32"
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return deep_merge(config, spec.config)


def reduce_in_fp32(spec: DeepSpeedSpec, grad_accum_steps: int) -> bool:
    """Whether gradients of a bf16 or fp16 model are reduced in fp32 (deepspeed.reduce_dtype)."""
    if spec.precision == "fp32" or spec.reduce_dtype == "model":
        return False
    return spec.reduce_dtype == "fp32" or grad_accum_steps > 1


def offload(spec: DeepSpeedSpec, on_gpu: bool) -> dict[str, Any]:
    """ZeRO's offload_optimizer and offload_param for deepspeed.offload (page-locked host buffers on GPUs only)."""
    off = spec.offload
    out: dict[str, Any] = {}
    for key, device in (("offload_optimizer", off.optimizer), ("offload_param", off.params)):
        if device != "none":
            out[key] = {"device": device, "pin_memory": off.pin_memory and on_gpu,
                        **({"nvme_path": off.nvme_path} if device == "nvme" else {})}
    return out


def _overlap(spec: DeepSpeedSpec, on_gpu: bool, model_params: int | None) -> dict[str, Any]:
    """ZeRO's overlap of gradient reduction with backward, where it applies (stages 1-3; stage 3 has it on
    already), with buckets small enough to overlap."""
    overlap = on_gpu if spec.overlap_comm is None else spec.overlap_comm
    if spec.zero_stage == 0 or (spec.overlap_comm is None and spec.zero_stage == 3):
        return {}
    if not overlap:
        return {"overlap_comm": False} if spec.overlap_comm is False else {}
    out: dict[str, Any] = {"overlap_comm": True}
    if model_params and spec.zero_stage in (1, 2):
        bucket = int(min(MAX_BUCKET, max(MIN_BUCKET, model_params // 4)))
        out.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return out


def _scheduler(spec: DeepSpeedSpec, max_steps: int) -> dict[str, Any]:
    sched = spec.schedule
    # DeepSpeed needs at least one warmup step; 1 step at full lr is "no warmup".
    warmup = max(1, min(sched.warmup_steps, max_steps))
    if sched.decay == "constant":
        return {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": spec.optimizer.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(max_steps, warmup + 1),
            "warmup_min_ratio": 0.0,
            "warmup_num_steps": warmup,
            "cos_min_ratio": sched.min_lr_ratio,
            "warmup_type": "linear",
        },
    }


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """base with override laid over it, recursing into dicts; neither input is changed."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
