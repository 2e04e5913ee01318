"""`shardrun generate`: text sampled from an export folder: the built-in GPT's own format (bytes), a Hugging
Face folder (`export --format hf`, or any from_pretrained folder) through transformers' generate, with its
tokenizer (a byte-level model needs none), or a LoRA run's adapters in peft's format over their base model."""

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


NOT_GENERATIVE = ("{what}, which labels text and writes none; load it with "
                  "transformers' AutoModelForSequenceClassification.from_pretrained (after `shardrun export --format "
                  "hf` for a run)")


ADAPTER_CONFIG = "adapter_config.json"
"""peft's file in a folder of adapters (a model.lora run's export)."""


def is_hf_folder(folder: str) -> bool:
    """A transformers folder (its config.json names a model type) or peft's adapters, not shardrun's own export
    format."""
    if Path(folder, ADAPTER_CONFIG).is_file():
        return True
    try:
        config = json.loads(Path(folder, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "model_type" in config


@torch.no_grad()
def generate_hf(folder: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    """Text after prompt from a transformers causal LM folder: its tokenizer when the folder has one, bytes for a
    byte-level model (vocab_size 256, as the built-in GPT exports)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if temperature <= 0:
        raise UserError(f"--temperature must be positive (got {temperature})")
    if Path(folder, ADAPTER_CONFIG).is_file():
        model = load_adapters(folder)
    else:
        architectures = json.loads(Path(folder, "config.json").read_text()).get("architectures") or []
        if any("ForSequenceClassification" in a for a in architectures):
            raise UserError(NOT_GENERATIVE.format(what=f"{folder} holds a {architectures[0]}, a sequence classifier"))
        from shardrun.trainer.models.hf import no_progress_bars

        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if any(Path(folder, name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if ids.numel() == 0:
            first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = torch.tensor([[first or 0]])
        decode = tokenizer.decode
    elif model.config.vocab_size == 256:
        ids = torch.tensor([list(prompt.encode()) or [10]])
        decode = lambda tokens: bytes(tokens).decode("utf-8", errors="replace")  # noqa: E731
    else:
        raise UserError(f"{folder} has no tokenizer (tokenizer.json) for its {model.config.vocab_size} tokens: "
                        "copy the model's tokenizer files there")
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, do_sample=True, temperature=temperature, top_k=top_k or 0,
                         max_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id or 0)
    return decode(out[0, ids.shape[1]:].tolist())


def load_adapters(folder: str):
    """peft's adapters in folder over the base model their config names (a folder or a Hub id), in eval mode."""
    config = json.loads(Path(folder, ADAPTER_CONFIG).read_text())
    if config.get("task_type") == "SEQ_CLS":
        raise UserError(NOT_GENERATIVE.format(what=f"{folder} holds adapters of a sequence classifier"))
    base = config.get("base_model_name_or_path") or ""
    if "://" in base:
        raise UserError(f"{folder}: its adapters' base model is {base}, which peft cannot load from storage: export "
                        "the run with --merge, or set base_model_name_or_path in its adapter_config.json to a copy of "
                        "the base model on this machine")
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError:
        raise UserError(f"{folder} holds LoRA adapters, which need peft: pip install 'shardrun[lora]'") from None
    from shardrun.trainer.models.hf import no_progress_bars

    with no_progress_bars():
        return AutoPeftModelForCausalLM.from_pretrained(folder).eval()

