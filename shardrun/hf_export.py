"""`shardrun export --format hf`: a checkpoint as a Hugging Face transformers folder, which
`AutoModelForCausalLM.from_pretrained(folder)` loads (a sequence classifier's run:
`AutoModelForSequenceClassification.from_pretrained(folder)`).

The built-in GPT is written as GPT-2 (GPT2LMHeadModel: the same blocks; nn.Linear weights transposed into GPT-2's
Conv1D layout, zero biases where the GPT has none, exact GELU). A model.hf run's weights are its transformers
model's (the training wrapper's `model.` taken off their names), under the config of model.hf.path with the run's
config_overrides; its tokenizer files and generation_config.json are copied along.

A model.lora run exports its adapters in peft's format (adapter_config.json naming the base model,
adapter_model.safetensors), which peft's `AutoPeftModelForCausalLM.from_pretrained(folder)` loads over the base; with
--merge, the base model with the adapters merged into its weights, as any other model.hf run's.

The model is built on the meta device, only to check the weights against it (every name, every shape) and to let
transformers write them (`save_pretrained`: safetensors, sharded above --max-shard-size, with their index): no
second copy of the weights is made, nothing is initialized. transformers is imported here only (the `hf` extra).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable

import torch

from shardrun.config import HFModelSpec, ModelSpec
from shardrun.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "chat_template.jinja", "chat_template.json")
"""The tokenizer's files, copied from model.hf.path where they exist."""
COPIED = (*TOKENIZER_FILES, "generation_config.json")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
GPT_GENERATION = {"do_sample": True, "temperature": 0.8, "top_k": 50}
"""`shardrun generate`'s sampling defaults, as the GPT's generation_config.json."""


def parse_size(text: str | int) -> int:
    """Bytes from 5GB, 500MB, 2GiB, 1000000 (GB: 10^9 bytes, GiB: 2^30, as transformers reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise UserError(f"--max-shard-size is a size such as 5GB, 500MB or 2GiB (got {text!r})")
    return int(float(match[1]) * UNITS[(match[2] or "").upper()])


def transformers_needed() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'shardrun[hf]'") from None


class Target:
    """What the checkpoint's weights become: a transformers model on the meta device (names, shapes, dtype, the
    config save_pretrained writes), the files to copy next to it, and how the gathered names map to its own."""

    def __init__(self, model, convert: Callable[[dict], dict], copy_from: str | None, what: str,
                 tokenizer: Callable[[str], None] | None = None, save: Callable[..., None] | None = None):
        self.model, self.convert, self.copy_from, self.what = model, convert, copy_from, what
        self.tokenizer = tokenizer
        """Writes the model's tokenizer into a folder, where none is copied from a source."""
        self.save = save or (lambda folder, state, max_shard_size: model.save_pretrained(
            folder, state_dict=state, max_shard_size=max_shard_size))
        """Writes the converted weights and the config into a folder (transformers' save_pretrained)."""


def byte_tokenizer(folder: str) -> None:
    """A transformers tokenizer whose ids are the text's UTF-8 bytes (`list(text.encode())`), as the byte-level
    GPT reads text: GPT-2's byte-level BPE over its 256 byte symbols, byte b at id b, no merges. Byte 0, which no
    text of the demo's holds, is its end-of-sequence token (`shardrun data prepare` ends documents with it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbol = byte_symbols()
    tok = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=symbol[BYTE_EOS],
                            model_max_length=int(1e30)).save_pretrained(folder)


BYTE_EOS = 0
"""The byte-level GPT's end of sequence, exported: byte 0."""


def byte_symbols() -> dict[int, str]:
    """GPT-2's printable symbol of each byte (its bytes_to_unicode), which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


def gpt2_config(spec: ModelSpec):
    """transformers' GPT-2 config of the built-in GPT: byte-level by default, with byte 0 as its end of sequence
    (byte_tokenizer), no bos token."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=spec.vocab_size, n_positions=spec.block_size, n_embd=spec.n_embd,
                      n_layer=spec.n_layer, n_head=spec.n_head, n_inner=4 * spec.n_embd,
                      activation_function="gelu",  # the GPT's F.gelu is exact (erf); GPT-2's gelu_new is not
                      resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=BYTE_EOS if spec.byte_level else None, pad_token_id=None,
                      architectures=["GPT2LMHeadModel"])


def gpt2_state(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The built-in GPT's weights under GPT-2's names: nn.Linear's (out, in) transposed into Conv1D's (in, out),
    zeros for the biases GPT-2 has and a GPT without bias lacks; the tied head left to the embedding."""
    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    with torch.device("meta"):
        reference = GPT(gpt_config(spec)).state_dict()
    check_names(state, reference, tied={"lm_head.weight"}, what="the built-in GPT")
    C = spec.n_embd

    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if name in state else torch.zeros(size)

    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    for i in range(spec.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"] = state[f"{src}{ln}.weight"]
            out[f"{dst}{ln}.bias"] = bias(f"{src}{ln}.bias", C)
        for gpt, gpt2, width in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                 ("mlp.fc", "mlp.c_fc", 4 * C), ("mlp.proj", "mlp.c_proj", C)):
            out[f"{dst}{gpt2}.weight"] = state[f"{src}{gpt}.weight"].t().contiguous()
            out[f"{dst}{gpt2}.bias"] = bias(f"{src}{gpt}.bias", width)
    out["transformer.ln_f.weight"] = state["ln_f.weight"]
    out["transformer.ln_f.bias"] = bias("ln_f.bias", C)
    return out


def check_names(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, tied: set[str],
                what: str) -> None:
    """state holds exactly reference's names (tied copies may be missing) at reference's shapes."""
    missing = sorted(reference.keys() - state.keys() - tied)
    unexpected = sorted(state.keys() - reference.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(reference[k].shape)})"
              for k in sorted(state.keys() & reference.keys()) if state[k].shape != reference[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                 for label, names in (("missing", missing), ("not in the model", unexpected),
                                      ("other shapes", shapes)) if names]
        raise UserError(f"the checkpoint's weights do not fit {what} ({'; '.join(parts)})")


def gpt_target(spec: ModelSpec, dtype: str) -> Target:
    from transformers import GenerationConfig, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(spec)).to(DTYPES[dtype])
    model.generation_config = GenerationConfig(**GPT_GENERATION, eos_token_id=model.config.eos_token_id)
    return Target(model, lambda state: gpt2_state(state, spec), None, "GPT-2",
                  tokenizer=byte_tokenizer if spec.byte_level else None)


def hf_target(spec: HFModelSpec, folder: str, dtype: str) -> Target:
    """The run's transformers model (config at folder, config_overrides and num_labels applied) on the meta
    device."""
    from shardrun.trainer.models.hf import auto_class, load_config, model_class

    config = load_config(folder, spec)
    model_class(config, spec)  # a clear error for a model that is not of its task
    with torch.device("meta"):
        model = auto_class(spec).from_config(config, dtype=DTYPES[dtype], trust_remote_code=spec.trust_remote_code)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        other = sorted(k for k in state if not k.startswith("model."))
        if other:
            raise UserError(f"the checkpoint's weights are not a model.hf run's (names without model.: "
                            f"{', '.join(other[:8])})")
        return hf_state({k.removeprefix("model."): v for k, v in state.items()}, model)

    return Target(model, convert, folder, type(model).__name__)


def hf_state(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """state checked against the model (strict: names and shapes; a tied copy, lm_head.weight with
    tie_word_embeddings, may be missing) and the tied copies left out: transformers ties them when it loads."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {copy: source}
    check_names(state, model.state_dict(), tied=set(tied), what=type(model).__name__)
    for copy, source in tied.items():
        if copy in state and source in state and not torch.equal(state[copy], state[source]):
            raise UserError(f"{copy} and {source} differ in the checkpoint, but the model's config ties them "
                            "(tie_word_embeddings)")
        state.pop(copy, None)
    return state


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What peft's save_pretrained writes for a LoRA run's adapters (its model card, README.md, is left out)."""


def peft_model(spec: ModelSpec, folder: str, dtype: str):
    """The run's transformers model on the meta device with its LoRA adapters (peft), as it trained."""
    from shardrun.trainer.models.hf import apply_lora

    with torch.device("meta"):
        return apply_lora(hf_target(spec.hf, folder, dtype).model, spec.lora, spec.hf)


def adapter_names(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (a model.lora run's: adapters alone) under the peft model's names, checked against
    the weights that train in it."""
    other = sorted(k for k in state if not k.startswith("model."))
    if other:
        raise UserError(f"the checkpoint's weights are not a model.hf run's (names without model.: "
                        f"{', '.join(other[:8])})")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    check_names(state, {k: p for k, p in model.named_parameters() if p.requires_grad}, tied=set(),
                what="the run's LoRA adapters")
    return state


def lora_target(spec: ModelSpec, folder: str, dtype: str, base_path: str) -> Target:
    """A model.lora run's adapters in peft's format; the adapter config names base_path as the base model."""
    model = peft_model(spec, folder, dtype)
    model.peft_config["default"].base_model_name_or_path = base_path

    def save(out: str, state: dict[str, torch.Tensor], max_shard_size: int) -> None:
        model.save_pretrained(out, state_dict=state, save_embedding_layers=False)
        for name in os.listdir(out):
            if name not in ADAPTER_FILES:
                os.remove(os.path.join(out, name))

    return Target(model, lambda state: adapter_names(state, model), folder, "LoRA adapters", save=save)


def merged_target(spec: ModelSpec, folder: str, dtype: str, emit: Callable[[str], None]) -> Target:
    """A model.lora run as its base model with the adapters merged into the weights (W + alpha/r B A): the base
    weights are loaded (fp32, on this machine: model.hf.path's local folder, or its copy in the node cache)."""
    from shardrun.errors import redact
    from shardrun.trainer.models.hf import DTYPES as LOAD_DTYPES
    from shardrun.trainer.models.hf import apply_lora, auto_class, load_config, local_folder, no_progress_bars

    target = hf_target(spec.hf, folder, dtype)
    meta = peft_model(spec, folder, dtype)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        adapters = adapter_names(state, meta)
        weights = local_folder(spec.hf, emit=emit)
        emit(f"merging the adapters into the weights of {redact(spec.hf.path)}")
        with no_progress_bars():
            base = auto_class(spec.hf).from_pretrained(weights, config=load_config(weights, spec.hf),
                                                       dtype=LOAD_DTYPES["fp32"])
        model = apply_lora(base, spec.lora, spec.hf)
        model.load_state_dict(adapters, strict=False)
        merged = model.merge_and_unload()
        return hf_state(dict(merged.state_dict()), target.model)

    return Target(target.model, convert, folder, target.what, save=target.save)


def prepare(spec: ModelSpec, dtype: str, stack: contextlib.ExitStack, emit: Callable[[str], None], *,
            merge: bool = False) -> Target:
    """What the export writes, known before the checkpoint is read (a wrong config fails first)."""
    transformers_needed()
    if merge and spec.lora is None:
        raise UserError("--merge is for a model.lora run (it merges the adapters into the base model's weights)")
    if spec.hf is None:
        return gpt_target(spec, dtype)
    from shardrun.trainer.models.hf import source_folder

    folder = stack.enter_context(source_folder(spec.hf, emit))
    if spec.lora is None:
        return hf_target(spec.hf, folder, dtype)
    if merge:
        return merged_target(spec, folder, dtype, emit)
    return lora_target(spec, folder, dtype, base_reference(spec.hf))


def base_reference(spec) -> str:
    """model.hf.path as an adapter config names its base: a local folder absolute, a Hub id as it is, a URI with
    its secrets masked (peft cannot load from one: the export says so)."""
    from shardrun.errors import redact
    from shardrun.fs import is_uri

    if is_uri(spec.path):
        return redact(spec.path)
    path = os.path.expanduser(spec.path)
    return os.path.abspath(path) if os.path.isdir(path) else spec.path


def write(target: Target, state: dict[str, torch.Tensor], folder: str, *, dtype: str, max_shard_size: int) -> int:
    """The model's files into folder (config.json, generation_config.json, safetensors, their index when sharded),
    the source's tokenizer files and generation config; returns the weights' bytes."""
    state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
             for k, v in target.convert(state).items()}
    from shardrun.trainer.models.hf import no_progress_bars

    with no_progress_bars():
        target.save(folder, state, max_shard_size)
    if target.tokenizer is not None:
        target.tokenizer(folder)
    if target.copy_from is not None:
        for name in COPIED:
            if os.path.isfile(os.path.join(target.copy_from, name)):
                shutil.copyfile(os.path.join(target.copy_from, name), os.path.join(folder, name))
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))
