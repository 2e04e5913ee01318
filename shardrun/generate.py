"""`shardrun generate`: the built-in GPT from an export folder, and bytes sampled from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from shardrun.config import ModelSpec
from shardrun.errors import UserError


def load(export_dir: str, device: str = "cpu"):
    """The built-in GPT from an export folder, in eval mode."""
    from safetensors.torch import load_model

    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    config = json.loads(Path(export_dir, "config.json").read_text())
    model = GPT(gpt_config(ModelSpec.model_validate(config["model"])))
    if config["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    load_model(model, os.path.join(export_dir, "model.safetensors"), device=device)
    return model.eval()


@torch.no_grad()
def generate(model, prompt: bytes, *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 0) -> bytes:
    """Sample bytes after a byte-level prompt (the built-in GPT with vocab 256)."""
    if model.config.vocab_size != 256:
        raise UserError(f"generate samples byte-level models (vocab_size 256); this one has "
                        f"{model.config.vocab_size} tokens and its tokenizer is not part of the export")
    if temperature <= 0:
        raise UserError(f"--temperature must be positive (got {temperature})")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt) or [10]], dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = model.logits(idx[:, -model.config.block_size:])[:, -1, :].float() / temperature
        if top_k:
            cut = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < cut, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return bytes(idx[0, len(prompt):].tolist())
