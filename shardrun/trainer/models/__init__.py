"""Build the model a spec names: the built-in GPT or a user entrypoint. Nothing distributed here."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch.nn as nn

from shardrun.config import ModelSpec
from shardrun.errors import UserError
from shardrun.trainer.models.gpt import GPT, GPTConfig


def gpt_config(spec: ModelSpec) -> GPTConfig:
    """The GPT's own config from the spec's size fields."""
    return GPTConfig(
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_embd=spec.n_embd,
        block_size=spec.block_size,
        vocab_size=spec.vocab_size,
        dropout=spec.dropout,
        bias=spec.bias,
    )


def resolve_entrypoint(entrypoint: str) -> Callable[..., nn.Module]:
    """Import 'package.module:function'; a failure names the entrypoint and the cause."""
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"model.entrypoint {entrypoint!r}: cannot import {module_name!r} ({e}); "
            "run from the directory that holds it or install it"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"model.entrypoint {entrypoint!r}: {module_name} has no function {attr!r}")
    return factory


def vocab_size(spec: ModelSpec, module: nn.Module) -> int | None:
    """The vocabulary a model takes token ids from: the built-in GPT's, a Hugging Face model's config's; None
    for an entrypoint model (its own business)."""
    if spec.type == "gpt":
        return spec.vocab_size
    if spec.hf is not None:
        return getattr(getattr(getattr(module, "model", None), "config", None), "vocab_size", None)
    return None


def build(spec: ModelSpec) -> nn.Module:
    """A plain nn.Module whose forward(inputs, targets) returns the scalar loss (a Hugging Face model comes from
    models.hf.build, which needs its weights' folder)."""
    if spec.hf is not None:
        raise ValueError("model.hf: build it with shardrun.trainer.models.hf.build")
    if spec.entrypoint is None:
        return GPT(gpt_config(spec))
    model = resolve_entrypoint(spec.entrypoint)(**spec.args)
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model.entrypoint {spec.entrypoint!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def takes_positions(module: nn.Module) -> bool:
    """Whether the model's forward takes position_ids (the built-in GPT and Hugging Face models do)."""
    try:
        return "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def enable_checkpointing(model: nn.Module, spec: ModelSpec) -> None:
    """model.activation_checkpointing on the built model, through its enable_activation_checkpointing(every) (the
    built-in GPT's, a model.hf model's, or an entrypoint module's own); UserError for a module without it."""
    every = spec.checkpoint_every
    if not every:
        return
    hook = getattr(model, "enable_activation_checkpointing", None)
    if hook is None:
        raise no_checkpointing_hook(type(model).__name__, spec)
    hook(every)


def no_checkpointing_hook(name: str, spec: ModelSpec) -> UserError:
    return UserError(f"model.activation_checkpointing: {name} (from model.entrypoint {spec.entrypoint}) has no "
                     "enable_activation_checkpointing(every) method; add one that wraps its blocks in "
                     "torch.utils.checkpoint (docs/models.md), or set it false")


def check_checkpointing_hook(spec: ModelSpec) -> None:
    """Before Ray: an entrypoint model asked to checkpoint activations has the hook. The factory's module is
    made on torch's meta device (nothing allocated); a factory that cannot run there is left to the workers."""
    if spec.entrypoint is None or not spec.checkpoint_every:
        return
    import torch

    factory = resolve_entrypoint(spec.entrypoint)
    try:
        with torch.device("meta"):
            model = factory(**spec.args)
    except Exception:  # noqa: BLE001 - the user's factory may need real tensors or files: the workers check
        return
    if not hasattr(model, "enable_activation_checkpointing"):
        raise no_checkpointing_hook(type(model).__name__, spec)
