"""The DeepSpeed config a spec asks for, as a plain dict (no deepspeed import: testable alone)."""

from __future__ import annotations

import copy
from typing import Any

from shardrun.config import DeepSpeedSpec


def build_ds_config(spec: DeepSpeedSpec, *, max_steps: int, on_gpu: bool, grad_accum_steps: int | None = None,
                    load_universal: bool = False) -> dict[str, Any]:
    """shardrun's DeepSpeed config, with spec.config merged over it last.

    grad_accum_steps: this world size's (elastic runs keep the global batch); load_universal: the
    checkpoint to load was converted for another world size."""
    opt = spec.optimizer
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps or spec.grad_accum_steps,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage},
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
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return deep_merge(config, spec.config)


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
