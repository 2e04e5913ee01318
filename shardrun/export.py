"""A run's checkpoints: list them, consolidate one into a single safetensors file, sample text from it.

Checkpoints live in the run dir: `checkpoint_<step>` (written through Ray Train) or
`checkpoints/step_<step>` (`shardrun train`). An export is a folder of two files that need no
DeepSpeed: `model.safetensors` (the whole model, fp32 or bf16, ZeRO shards gathered) and
`config.json` (the model section of the run's spec, the step, the dtype).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs
import torch
import yaml

from shardrun import storage
from shardrun.config import ModelSpec, join
from shardrun.datasets.index import display_path, filesystem
from shardrun.errors import UserError, redact

MANIFEST = "shardrun.json"
_STEP_DIR = re.compile(r"^(?:checkpoint_|step_)(\d+)$")


def _local(run_dir: str) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"{run_dir} is no run dir: RUN is <checkpoint.storage>/<name>, e.g. ~/shardrun/runs/gpt-stdlib")
    return path


def checkpoints(run_dir: str) -> list[dict]:
    """Every checkpoint folder of the run, oldest first: step, path, bytes, complete, and why not. The run dir
    may be local or behind a URI (abfs://, s3://): only file listings and the manifests are read."""
    if "://" in run_dir:
        fs, root = filesystem(run_dir)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise UserError(f"{redact(run_dir)} is no run dir: RUN is <checkpoint.storage>/<name>")
    else:
        fs, root = pafs.LocalFileSystem(), str(_local(run_dir).resolve())
    found = []
    for parent in (root, f"{root.rstrip('/')}/checkpoints"):
        if fs.get_file_info(parent).type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(parent)):
            match = _STEP_DIR.match(entry.base_name)
            if entry.type == pafs.FileType.Directory and match:
                found.append(_describe(fs, entry.path, int(match[1]), run_dir))
    return sorted(found, key=lambda c: c["step"])


def _describe(fs: pafs.FileSystem, path: str, step: int, source: str) -> dict:
    files = {f.path[len(path):].lstrip("/"): f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    size = sum(f.size for f in files.values() if f.type == pafs.FileType.File)
    shown = redact(display_path(source, path)) if "://" in source else path
    info = {"step": step, "path": shown, "bytes": size, "complete": False, "why": "", "fs_path": path}
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        info["why"] = f"no readable {MANIFEST} (rank 0 had not finished)"
        return info
    missing = [r for r in range(manifest["world_size"]) if f"rank_{r}.pt" not in files]
    if missing:
        info["why"] = f"rank files missing: {missing}"
    elif not (manifest["tag"] in files or any(name.startswith(f"{manifest['tag']}/") for name in files)):
        # (object stores have no folders, only names with slashes)
        info["why"] = f"DeepSpeed's {manifest['tag']} folder is missing"
    else:
        info.update(complete=True, world_size=manifest["world_size"], zero_stage=manifest.get("zero_stage"),
                    precision=manifest.get("precision"))
    return info


def pick(run_dir: str, step: int | None = None) -> dict:
    """The newest complete checkpoint, or the one of `step`."""
    complete = [c for c in checkpoints(run_dir) if c["complete"]]
    if step is not None:
        chosen = [c for c in complete if c["step"] == step]
        if not chosen:
            raise UserError(f"{redact(run_dir)} has no complete checkpoint of step {step}; complete ones: "
                            f"{[c['step'] for c in complete] or 'none'}")
        return chosen[0]
    if not complete:
        raise UserError(f"{redact(run_dir)} has no complete checkpoint yet (checkpoint.every_steps decides when one "
                        "is saved)")
    return complete[-1]


def model_spec(run_dir: str) -> ModelSpec:
    """The model section of the run's resolved spec (job.yaml in the run dir, local or behind a URI)."""
    if "://" in run_dir:
        path = join(run_dir, "job.yaml")
        try:
            text = storage.read_text(path)
        except OSError as e:
            raise UserError(f"{redact(path)}: cannot read it ({redact(str(e))})") from None
    else:
        path = _local(run_dir) / "job.yaml"
        text = path.read_text() if path.is_file() else None
    if text is None:
        raise UserError(f"{redact(str(path))} is missing: it is written when a run starts; is {redact(run_dir)} "
                        "a run dir?")
    spec = ModelSpec.model_validate(yaml.safe_load(text)["model"])
    if spec.entrypoint is not None:
        raise UserError(f"{redact(run_dir)} trains {spec.entrypoint}: export writes the built-in GPT; for your own "
                        "model, use DeepSpeed's zero_to_fp32.py in the checkpoint folder")
    return spec


def consolidated_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint, ZeRO shards gathered (on the CPU)."""
    manifest = json.loads(Path(checkpoint_dir, MANIFEST).read_text())
    tag = manifest["tag"]
    if manifest.get("zero_stage", 1) == 0:  # no ZeRO: one file holds the module
        [states] = Path(checkpoint_dir, tag).glob("mp_rank_*_model_states.pt")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


@contextlib.contextmanager
def local_folder(run_dir: str, chosen: dict, emit: Callable[[str], None] = print) -> Iterator[str]:
    """The chosen checkpoint as a folder on this machine: itself, or, behind a URI, a download of it into a
    temporary folder (in TMPDIR; the whole checkpoint, optimizer state included: ZeRO keeps the fp32 weights
    there), removed afterwards."""
    if "://" not in run_dir:
        yield chosen["path"]
        return
    fs, _ = filesystem(run_dir)
    with tempfile.TemporaryDirectory(prefix=f"shardrun-step{chosen['step']}-") as tmp:
        emit(f"downloading checkpoint {chosen['step']} ({chosen['bytes'] / 1e6:,.1f} MB) from {chosen['path']} "
             f"to {tmp}")
        try:
            pafs.copy_files(chosen["fs_path"], tmp, source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        except OSError as e:
            raise UserError(f"{chosen['path']}: cannot download it ({redact(str(e))})") from None
        yield tmp


def export(run_dir: str, out: str, *, step: int | None = None, dtype: str = "fp32",
           emit: Callable[[str], None] = print) -> dict:
    """Write out/model.safetensors and out/config.json from the run's newest (or a chosen) checkpoint; the run
    dir may be local or behind a URI (abfs://, s3://)."""
    from safetensors.torch import save_model

    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype is fp32 or bf16 (got {dtype})")
    spec = model_spec(run_dir)
    chosen = pick(run_dir, step)
    model = GPT(gpt_config(spec))
    with local_folder(run_dir, chosen, emit) as folder:
        model.load_state_dict(consolidated_state(folder))
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    save_model(model, os.path.join(out, "model.safetensors"))  # the tied embedding is stored once
    config = {"model": spec.model_dump(mode="json"), "step": chosen["step"], "dtype": dtype,
              "source": chosen["path"]}
    Path(out, "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {**config, "out": out, "bytes": os.path.getsize(os.path.join(out, "model.safetensors"))}


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
