"""Hugging Face transformers models (model.hf): a causal LM or a sequence classifier, from pretrained weights or
from its config alone, as shardrun's loop calls a model (forward(inputs, targets) -> mean loss for token data;
forward(input_ids=..., label=..., [attention_mask=...]) -> mean loss for a table of labelled rows).

Where the weights come from (`local_folder`): a folder as it is; an abfs:// or s3:// URI copied once per node into
a cache keyed by URI and revision (the node's first rank copies, the others wait); a Hub id through
huggingface_hub (HF_HUB_OFFLINE honoured). Under ZeRO-3 the model is built inside `zero3_loading`, transformers'
DeepSpeed integration: each parameter is partitioned as it is made (deepspeed.zero.Init) and the pretrained
weights are loaded into each rank's shard, so no host ever holds the whole model.

transformers is imported by the functions here (the `hf` extra): runs of the built-in GPT do not need it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from shardrun import fs
from shardrun.config import HFModelSpec, LoraSpec
from shardrun.errors import UserError, redact
from shardrun.trainer.models.loss import mean_token_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
"""What is fetched of a model.hf.path behind a URI or on the Hub: its config, tokenizer and code, no weights."""
COPY_PROGRESS_EVERY_S = 10.0
"""A line on how far a model's copy from storage has come, this often."""
# peft asks transformers whether checkpointing is on under a name transformers deprecates, at every build and merge
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CausalLM(nn.Module):
    """A transformers causal LM; `model` is the transformers module (export strips the `model.` of its keys)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return mean_token_loss(self.model(input_ids=inputs, position_ids=position_ids).logits, targets)

    def enable_activation_checkpointing(self, every: int = 1) -> None:
        """transformers' gradient checkpointing (non-reentrant) on every `every`-th decoder layer."""
        enable_checkpointing(self.model, every)

    def flops_per_token(self, seq_len: int) -> float:
        """6 per trained parameter that takes part in a matmul (embeddings are lookups), 4 per frozen one (LoRA's
        base weights: no weight gradient), plus attention's 12 x layers x width x seq_len; ZeRO-3's partitioned
        parameters count whole."""
        config = self.model.config
        flops = 0.0
        for name, p in self.model.named_parameters():
            if "embed" not in name:
                flops += (6.0 if p.requires_grad else 4.0) * _numel(p)
        if getattr(config, "tie_word_embeddings", False):  # the tied head is a matmul
            trained = self.model.get_input_embeddings().weight.requires_grad
            flops += (6.0 if trained else 4.0) * config.vocab_size * config.hidden_size
        layers = getattr(config, "num_hidden_layers", 0)
        return flops + 12.0 * layers * getattr(config, "hidden_size", 0) * seq_len


class SequenceClassifier(nn.Module):
    """A transformers sequence classifier over table rows: the table's input_ids (attention_mask, token_type_ids,
    position_ids when it has them) in, the mean cross-entropy against `label` out."""

    COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    """The table columns the model takes (data.label aside)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, label: torch.Tensor, **columns: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids.long(), **{k: v.long() for k, v in columns.items()}).logits
        return F.cross_entropy(logits.float(), label.long().reshape(-1))

    flops_per_token = CausalLM.flops_per_token
    enable_activation_checkpointing = CausalLM.enable_activation_checkpointing


def enable_checkpointing(model: nn.Module, every: int) -> None:
    """transformers' activation checkpointing, non-reentrant, on every `every`-th decoder layer (its own
    every_n_layers; before transformers had it, gradient checkpointing turned off again on the layers between,
    each GradientCheckpointingLayer asking its own flag)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs, every_n_layers=every)
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0


def apply_lora(model: nn.Module, lora: LoraSpec, spec: HFModelSpec) -> nn.Module:
    """model (a transformers model) with peft's LoRA adapters on lora.target_modules, its own weights frozen: a
    peft PeftModel. UserError when peft is missing or the model has no such modules."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("model.lora needs peft: pip install 'shardrun[lora]'") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, modules_to_save=list(lora.modules_to_save) or None,
                        task_type="SEQ_CLS" if spec.classifies else "CAUSAL_LM",
                        # GPT-2's Conv1D layers store their weights transposed
                        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        names = ", ".join(sorted(linear_names(model))[:12]) or "none"
        raise UserError(f"model.lora: {' '.join(str(e).split())[:300]} ({type(model).__name__}'s linear layers are "
                        f"named {names})") from None


def linear_names(model: nn.Module) -> set[str]:
    """The last name of each linear layer of model (q_proj, v_proj, ...): what lora.target_modules names."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def load_config(folder: str, spec: HFModelSpec):
    """The model's config from folder, spec.config_overrides applied; UserError for an unknown architecture or a
    model that needs its own code while trust_remote_code is off."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        text = " ".join(str(e).split())
        if "trust_remote_code" in text:
            raise UserError(f"model.hf.path {redact(spec.path)}: this model runs its own code "
                            "(its config names classes transformers does not have); set model.hf.trust_remote_code: "
                            "true if you trust its source") from None
        raise UserError(f"model.hf.path {redact(spec.path)}: cannot read its config.json ({redact(text)[:400]})"
                        ) from None
    unknown = [key for key in spec.config_overrides if not hasattr(config, key)]
    if unknown:
        raise UserError(f"model.hf.config_overrides: {config.model_type}'s config has no {', '.join(unknown)}")
    config.update(dict(spec.config_overrides))
    if spec.classifies and config.num_labels != spec.num_labels:
        config.num_labels = spec.num_labels  # also remakes id2label / label2id
    return config


TASKS = {"causal_lm": ("AutoModelForCausalLM", "causal LM"),
         "sequence_classification": ("AutoModelForSequenceClassification", "sequence classifier")}
"""model.hf.task -> transformers' auto class, and what the messages call it."""


def auto_class(spec: HFModelSpec):
    """transformers' auto class of the task (AutoModelForCausalLM, AutoModelForSequenceClassification)."""
    import transformers

    return getattr(transformers, TASKS[spec.task][0])


def model_class(config, spec: HFModelSpec):
    """transformers' class for config and the task; UserError when there is none (a causal LM of an encoder, an
    unknown type). None for a model's own class (trust_remote_code), which the auto class finds."""
    try:
        return auto_class(spec)._model_mapping[type(config)]
    except KeyError:
        if spec.trust_remote_code and getattr(config, "auto_map", None):
            return None
        named = ", ".join(getattr(config, "architectures", None) or []) or "no architectures named"
        raise UserError(f"model.hf.path {redact(spec.path)}: transformers has no {TASKS[spec.task][1]} for model "
                        f"type {config.model_type!r} ({named})") from None


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside the block: on a run's
    console or an export's they are a redrawn line each rank repeats, where shardrun says what it loads."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def build(spec: HFModelSpec, folder: str, lora: LoraSpec | None = None) -> CausalLM | SequenceClassifier:
    """The model from folder (local_folder's): pretrained weights, or random ones with from_scratch (seed torch
    first: every rank must build the same; so is a classifier's new head over a pretrained body, and so are LoRA
    adapters, which lora puts on it, its weights frozen)."""
    config = load_config(folder, spec)
    model_class(config, spec)
    auto = auto_class(spec)
    common = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation,
              "trust_remote_code": spec.trust_remote_code}
    if not spec.from_scratch and not any(os.path.exists(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise UserError(f"model.hf.path {redact(spec.path)}: no weights there (none of {', '.join(WEIGHT_FILES)}); "
                        "set model.hf.from_scratch: true to train its architecture from random weights")
    try:
        if spec.from_scratch:
            model = auto.from_config(config, **common)
        else:
            with no_progress_bars():
                model = auto.from_pretrained(folder, config=config, revision=spec.revision, **common)
    except ImportError as e:  # flash-attn missing or unusable on this node: every attempt would fail alike
        if spec.attn_implementation != "flash_attention_2":
            raise
        raise UserError(f"model.hf.attn_implementation flash_attention_2 on this node: {' '.join(str(e).split())}"
                        [:500]) from None
    if lora is not None:
        model = apply_lora(model, lora, spec)
    return SequenceClassifier(model) if spec.classifies else CausalLM(model)


@contextlib.contextmanager
def zero3_loading(ds_config: dict) -> Iterator[None]:
    """Inside the block, transformers builds models partitioned by ZeRO-3 as it makes them (its DeepSpeed
    integration reads the config through this object, which must stay alive while the model is built and the
    engine made)."""
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


@contextlib.contextmanager
def source_folder(spec: HFModelSpec, emit) -> Iterator[str]:
    """model.hf.path's config, tokenizer and code on this machine (the driver's checks, export): the folder
    itself, or its small files (no weights) fetched from a URI into a temporary folder or from the Hub into its
    cache. The weights, on a worker, come through local_folder."""
    path = os.path.expanduser(spec.path)
    if fs.is_uri(spec.path):
        with tempfile.TemporaryDirectory(prefix="shardrun-hf-") as tmp:
            _fetch_small_files(spec.path, tmp, emit)
            yield tmp
    elif os.path.isdir(path):
        yield path
    elif spec.path.count("/") == 1 and not spec.path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            yield snapshot_download(spec.path, revision=spec.revision, allow_patterns=list(SMALL_FILES))
        except Exception as e:  # noqa: BLE001 - the Hub client's errors are many (offline, not found, gated)
            raise UserError(f"model.hf.path {spec.path}: cannot fetch its config from the Hugging Face Hub "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    else:
        raise UserError(f"model.hf.path {spec.path}: no such folder here (a local folder, an abfs:// or s3:// URI, "
                        "or a Hub id org/name)")


def _fetch_small_files(uri: str, into: str, emit) -> None:
    import pyarrow.fs as pafs

    storage, root = fs.filesystem(uri)
    root = root.rstrip("/")
    try:
        infos = storage.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"model.hf.path {redact(uri)}: cannot list it ({redact(str(e))})") from None
    names = [i.base_name for i in infos if i.type == pafs.FileType.File
             and any(fnmatch.fnmatch(i.base_name, p) for p in SMALL_FILES)]
    if "config.json" not in names:
        raise UserError(f"model.hf.path {redact(uri)}: no config.json there")
    emit(f"reading the model's config and tokenizer from {redact(uri)}")
    for name in names:
        with storage.open_input_stream(f"{root}/{name}") as src, open(os.path.join(into, name), "wb") as dst:
            dst.write(src.read())


def cache_dir(uri: str, revision: str | None) -> Path:
    """The node-local copy of a model at uri: ~/.cache/shardrun/hf/<hash of the URI without its query, and the
    revision>."""
    base, _ = fs.split_query(uri)
    key = hashlib.sha256(f"{base} {revision or ''}".encode()).hexdigest()[:16]
    return Path(os.environ.get("SHARDRUN_HF_CACHE", Path.home() / ".cache" / "shardrun" / "hf")) / key


def local_folder(spec: HFModelSpec, *, local_rank: int = 0, emit=fs.log) -> str:
    """A folder on this machine holding the model: copied from a URI once per node (the node's first rank; the
    others wait at a barrier), fetched from the Hub, or the path itself."""
    if fs.is_uri(spec.path):
        target = cache_dir(spec.path, spec.revision)
        if local_rank == 0 and not (target / ".complete").exists():
            _copy_from_storage(spec.path, target, emit)
        _node_barrier()
        return str(target)
    if os.path.isdir(os.path.expanduser(spec.path)):
        return os.path.expanduser(spec.path)
    if spec.path.count("/") == 1 and not spec.path.startswith((".", "/", "~")):
        return _from_hub(spec, local_rank)
    raise UserError(f"model.hf.path {spec.path}: no such folder (a local folder, an abfs:// or s3:// URI, or a Hub id "
                    "org/name)")


def _copy_from_storage(uri: str, target: Path, emit) -> None:
    import pyarrow.fs as pafs

    storage, path = fs.filesystem(uri)
    try:
        infos = [i for i in storage.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File]
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"model.hf.path {redact(uri)}: cannot list it ({redact(str(e))})") from None
    names = {i.path[len(path.rstrip('/')) + 1:]: i.size for i in infos}
    if "config.json" not in names:
        raise UserError(f"model.hf.path {redact(uri)}: no config.json there")
    total = sum(names.values())
    emit(f"copying the model from {redact(uri)} ({total / 1e6:,.1f} MB, {len(names)} files) to this node's cache, "
         f"{target}")
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # pyarrow copies the files in parallel; we watch
        copy = pool.submit(pafs.copy_files, path, str(staging), source_filesystem=storage,
                           destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        while True:
            try:
                copy.result(timeout=COPY_PROGRESS_EVERY_S)
                break
            except concurrent.futures.TimeoutError:
                done = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
                seconds = time.monotonic() - start
                emit(f"copying the model: {done / 1e6:,.0f} of {total / 1e6:,.0f} MB ({done / max(total, 1):.0%}), "
                     f"{done / 1e6 / seconds:,.0f} MB/s")
            except OSError as e:
                raise UserError(f"model.hf.path {redact(uri)}: cannot copy it ({redact(str(e))})") from None
    seconds = time.monotonic() - start
    emit(f"copied the model in {seconds:,.1f} s ({total / 1e6 / max(seconds, 1e-3):,.0f} MB/s)")
    (staging / ".complete").write_text(redact(uri) + "\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(staging, target)


def _from_hub(spec: HFModelSpec, local_rank: int) -> str:
    from huggingface_hub import snapshot_download

    def fetch() -> str:
        try:
            return snapshot_download(spec.path, revision=spec.revision)
        except Exception as e:  # noqa: BLE001 - the Hub client's errors are many (offline, not found, gated)
            raise UserError(f"model.hf.path {spec.path}: cannot fetch it from the Hugging Face Hub "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None

    if local_rank == 0:
        folder = fetch()
        _node_barrier()
        return folder
    _node_barrier()
    return fetch()  # from the cache the node's first rank filled


def _node_barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
