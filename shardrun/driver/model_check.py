"""A Hugging Face model (model.hf) checked on the driver before any cluster resource: its config readable and its
architecture one transformers knows for the task; for token data, the data's token ids within its vocabulary, the
data's tokenizer the model's, data.seq_len within its positions; for a classifier's table, the columns it takes and
labels below num_labels. Its size and the memory each rank's share of training state takes are said, and a GPU
run whose share cannot fit the GPU is refused (here when the GPU is on this machine, else on the workers before
the optimizer state is made)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from collections.abc import Callable

from shardrun.config import JobSpec
from shardrun.errors import UserError, redact
from shardrun.memory import ModelShape, check_fits, count_text, estimate_line, gpu_memory, on_device, spec_states


def check_hf_model(spec: JobSpec, index, emit: Callable[[str], None]) -> ModelShape:
    """UserError, naming what and where, for a model the run cannot train on the data of index (a DataIndex); else
    a line with its size, and its shape for the memory estimate."""
    from shardrun.trainer.models import hf

    hf_spec = spec.model.hf
    with hf.source_folder(hf_spec, emit) as folder:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"model.hf.path {hf_spec.path}: no config.json there (a Hugging Face model folder holds "
                            "config.json and its weights)")
        config = hf.load_config(folder, hf_spec)
        model_class = hf.model_class(config, hf_spec)
        tokenizer = tokenizer_name(folder)
    where = redact(hf_spec.path)
    if hf_spec.classifies:
        check_table(spec, index, config, model_class, where)
    else:
        check_tokens(spec, index, config, tokenizer, where)
    shape = model_shape(config, hf_spec, spec.model.lora)
    kind = model_class.__name__ if model_class else (getattr(config, "architectures", None) or [config.model_type])[0]
    lora = spec.model.lora
    adapters = (f", LoRA r={lora.r} on {lora_targets(lora)}: {count_text(shape.trained)} of them train "
                f"({shape.trained / shape.params:.2%})" if lora else "")
    emit(f"model: {kind} from {where}, {count_text(shape.params)} parameters{adapters}")
    if local_gpus(spec):
        if hf_spec.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.hf.attn_implementation flash_attention_2 needs the flash-attn package, which "
                            "is not installed here (pip install flash-attn, or use sdpa)")
    return shape


def local_gpus(spec: JobSpec) -> bool:
    """A run on this machine's GPUs (not submitted to a Ray cluster)."""
    return spec.scaling.use_gpu and not os.environ.get("RAY_ADDRESS")


def check_memory(spec: JobSpec, shape: ModelShape, index, emit: Callable[[str], None]) -> None:
    """The memory estimate per rank (memory.estimate_line; a table's rows as long as its input_ids); a local GPU
    run whose weights, gradients and optimizer state alone are more than the GPU holds is refused (UserError)."""
    world = spec.scaling.max_workers
    device = gpu_memory() if local_gpus(spec) else None
    width = re.search(r"\[(\d+)\]$", index.schema.get("input_ids", ""))  # fixed_size_list<item: int32>[16]
    emit(estimate_line(shape, spec, world, device, seq_len=spec.data.seq_len or (int(width[1]) if width else None)))
    if device is not None:
        check_fits(shape.params, device, spec=spec, world=world, where="this machine's GPU",
                   need=on_device(spec_states(shape, spec, world)))


def gpt_shape(model) -> ModelShape:
    """The built-in GPT's shape (model: its ModelSpec): its token embedding is its output head."""
    from shardrun.driver.run_log import gpt_parameters

    params = gpt_parameters(model.n_layer, model.n_embd, model.block_size, model.vocab_size, model.bias)
    largest = max(model.vocab_size, 4 * model.n_embd) * model.n_embd  # the embedding, or an MLP matrix
    return ModelShape(params=params, trained=params, largest_layer=largest,
                      layers=model.n_layer, hidden=model.n_embd, intermediate=4 * model.n_embd, heads=model.n_head,
                      vocab=model.vocab_size)


def check_tokens(spec: JobSpec, index, config, tokenizer: str | None, where: str) -> None:
    """Token data fits a causal LM: its ids within the vocabulary, made by the model's tokenizer, rows within its
    positions."""
    data_vocab = index.vocab_size
    if data_vocab and data_vocab > config.vocab_size:
        raise UserError(f"data.paths: the shards' token ids go up to {data_vocab - 1} (their tokenizer's vocabulary), "
                        f"but {where} takes ids below {config.vocab_size} (its vocab_size): prepare the data with the "
                        "model's own tokenizer (shardrun data prepare-text --tokenizer <its tokenizer.json>)")
    data_tokenizer = index.metadata.get("shardrun.tokenizer")
    if data_tokenizer and tokenizer and data_tokenizer.split()[-1] != tokenizer.split()[-1]:
        raise UserError(f"data.paths: the shards were made by the tokenizer {data_tokenizer}, but {where}'s is "
                        f"{tokenizer}: the same ids would mean other tokens; prepare the data with the model's own "
                        "tokenizer (shardrun data prepare-text --tokenizer <its tokenizer.json>)")
    positions = getattr(config, "max_position_embeddings", None)
    if spec.data.seq_len and positions and spec.data.seq_len > positions:
        raise UserError(f"data.seq_len ({spec.data.seq_len}) is longer than {where} takes "
                        f"(max_position_embeddings {positions})")


def check_table(spec: JobSpec, index, config, model_class, where: str) -> None:
    """A table fits a sequence classifier: the columns it takes (input_ids, and attention_mask, token_type_ids,
    position_ids), labels within num_labels, a padding id when the model reads each row's last real token."""
    from shardrun.datasets.index import column_ranges
    from shardrun.trainer.models.hf import SequenceClassifier

    label = spec.data.label
    features = [c for c in index.schema if c != label]
    other = [c for c in features if c not in SequenceClassifier.COLUMNS]
    if "input_ids" not in features or other:
        raise UserError(f"data.paths: a sequence classifier takes the columns {', '.join(SequenceClassifier.COLUMNS)} "
                        f"and data.label; the table has {', '.join(features) or 'no other column'}"
                        + (" (set data.columns to those it takes)" if other and "input_ids" in features else ""))
    ranges = column_ranges(index, [label, "input_ids"])
    low, high = ranges[label]
    if low is not None and (low < 0 or high >= spec.model.hf.num_labels):
        raise UserError(f"data.label {label!r}: its values run from {low:g} to {high:g}, but model.hf.num_labels is "
                        f"{spec.model.hf.num_labels} (labels 0 .. {spec.model.hf.num_labels - 1})")
    vocab = getattr(config, "vocab_size", None)
    _, ids_high = ranges["input_ids"]
    if vocab and ids_high is not None and ids_high >= vocab:
        raise UserError(f"data.paths: input_ids go up to {ids_high:g}, but {where} takes ids below {vocab} (its "
                        "vocab_size): tokenize the table with the model's own tokenizer")
    if config.pad_token_id is None and reads_padding(model_class) and spec.deepspeed.micro_batch_size > 1:
        raise UserError(f"{where}: its classifier reads each row's last token that is not padding, and its config "
                        "has no pad_token_id; set model.hf.config_overrides: {pad_token_id: <the id the table pads "
                        "input_ids with>}")


def reads_padding(model_class) -> bool:
    """Whether a classifier finds each row's last real token by config.pad_token_id (decoders: GPT-2, Llama, ...;
    an encoder such as BERT pools its first token instead)."""
    try:
        return model_class is not None and "pad_token_id" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False


def tokenizer_name(folder: str) -> str | None:
    """The model's tokenizer as data names the one it was made with (shardrun.datasets.prepare.tokenizer_name:
    `bytes`, or `tokenizer.json sha256:<digest>`), if the folder has a tokenizer.json."""
    from pathlib import Path

    from shardrun.datasets.prepare import tokenizer_name as name

    path = Path(folder, "tokenizer.json")
    return name(path) if path.is_file() else None


def model_shape(config, spec, lora=None) -> ModelShape:
    """The model's parameters, those that train (spec: its HFModelSpec; lora: model.lora, whose adapters are put on
    the model: UserError when it has no such modules) and its largest module's, counted on torch's meta device
    (nothing allocated; tied weights once), with its config's sizes."""
    import torch

    from shardrun.trainer.models.hf import apply_lora, auto_class

    with torch.device("meta"):
        model = auto_class(spec).from_config(config, trust_remote_code=spec.trust_remote_code)
        if lora is not None:
            model = apply_lora(model, lora, spec)
    params = trained = 0
    for p in model.parameters():
        params += p.numel()
        trained += p.numel() if p.requires_grad else 0
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    hidden = getattr(config, "hidden_size", 0) or 0
    return ModelShape(params=params, trained=trained, largest_layer=largest,
                      layers=getattr(config, "num_hidden_layers", 0) or 0, hidden=hidden,
                      intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                      heads=getattr(config, "num_attention_heads", 0) or 0,
                      vocab=spec.num_labels if spec.classifies else getattr(config, "vocab_size", 0) or 0,
                      eager_attention=spec.attn_implementation == "eager")


def lora_targets(lora) -> str:
    """`q_proj, v_proj`, or `every linear layer`."""
    return "every linear layer" if lora.target_modules == "all-linear" else ", ".join(lora.target_modules)
