"""A Hugging Face model (model.hf) checked on the driver before any cluster resource: its config readable and its
architecture a causal LM transformers knows, the data's token ids within its vocabulary, data.seq_len within its
positions; its size and the memory each rank's share of training state takes, said."""

from __future__ import annotations

import os
from collections.abc import Callable

from shardrun.config import JobSpec
from shardrun.errors import UserError, redact

GIB = 1024**3


def state_bytes_per_rank(params: int, *, stage: int, precision: str, world: int) -> float:
    """Bytes of weights, gradients and Adam's state one rank holds (ZeRO's accounting, activations aside): in
    bf16/fp16 2 + 2 bytes of weights and gradients and 12 of fp32 master weights and moments per parameter, in
    fp32 4 + 4 and 8; ZeRO 1 shards the optimizer state, 2 the gradients too, 3 everything."""
    low = precision != "fp32"
    weights = grads = 2 if low else 4
    optimizer = 12 if low else 8
    if stage == 0:
        return params * (weights + grads + optimizer)
    if stage == 1:
        return params * (weights + grads) + params * optimizer / world
    if stage == 2:
        return params * weights + params * (grads + optimizer) / world
    return params * (weights + grads + optimizer) / world


def check_hf_model(spec: JobSpec, data_vocab: int | None, emit: Callable[[str], None]) -> None:
    """UserError, naming what and where, for a model the run cannot train; else a line with its size."""
    from shardrun.trainer.models import hf

    hf_spec = spec.model.hf
    with hf.source_folder(hf_spec, emit) as folder:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"model.hf.path {hf_spec.path}: no config.json there (a Hugging Face model folder holds "
                            "config.json and its weights)")
        config = hf.load_config(folder, hf_spec)
        hf.causal_lm_class(config, hf_spec)
    where = redact(hf_spec.path)
    if data_vocab and data_vocab > config.vocab_size:
        raise UserError(f"data.paths: the shards' token ids go up to {data_vocab - 1} (their tokenizer's vocabulary), "
                        f"but {where} takes ids below {config.vocab_size} (its vocab_size): prepare the data with the "
                        "model's own tokenizer (shardrun data prepare-text --tokenizer <its tokenizer.json>)")
    positions = getattr(config, "max_position_embeddings", None)
    if spec.data.seq_len and positions and spec.data.seq_len > positions:
        raise UserError(f"data.seq_len ({spec.data.seq_len}) is longer than {where} takes "
                        f"(max_position_embeddings {positions})")
    params = count_parameters(config, hf_spec.trust_remote_code)
    world = spec.scaling.max_workers
    need = state_bytes_per_rank(params, stage=spec.deepspeed.zero_stage, precision=spec.deepspeed.precision,
                                world=world)
    kind = (getattr(config, "architectures", None) or [config.model_type])[0]
    emit(f"model: {kind} from {where}, {count_text(params)} parameters; weights, gradients and optimizer state "
         f"take about {bytes_text(need)} per rank at ZeRO {spec.deepspeed.zero_stage} in "
         f"{spec.deepspeed.precision} on {world} workers (activations come on top)")


def count_text(n: int) -> str:
    """`1.24 B`, `124.4 M`, `34,976`."""
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n:,}"


def bytes_text(n: float) -> str:
    """`3.75 GiB`, `412.0 MiB`."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 1024**2:,.1f} MiB"


def count_parameters(config, trust_remote_code: bool) -> int:
    """The model's parameters, counted on torch's meta device (nothing allocated); tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
