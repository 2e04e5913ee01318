"""`shardrun export`: consolidate a run's checkpoint into a single safetensors file.

An export is a folder of two files that need no DeepSpeed: `model.safetensors` (the whole model, fp32 or
bf16, ZeRO shards gathered) and `config.json` (the model section of the run's spec, the step, the dtype).
With --format hf it is a Hugging Face transformers folder instead (hf_export.py), and EXPORT_RECORD in it says
which files the export wrote. Which checkpoints a run has, and which are complete, is the checkpoint format's
(checkpoint_format.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs
import torch
import yaml

from shardrun import fs
from shardrun.checkpoint_format import local_run_dir, pick, read_manifest
from shardrun.config import ModelSpec
from shardrun.errors import UserError, redact

FORMATS = ("shardrun", "hf")


def model_spec(run_dir: str, fmt: str = "shardrun") -> ModelSpec:
    """The model section of the run's resolved spec (job.yaml in the run dir, local or behind a URI), if `fmt`
    can export it: shardrun's format the built-in GPT; hf the built-in GPT and model.hf runs."""
    spec = ModelSpec.model_validate(job_yaml(run_dir)[0]["model"])
    if spec.entrypoint is not None:
        what = ("--format hf writes the built-in GPT (as GPT-2) and model.hf runs (as their transformers model)"
                if fmt == "hf" else "export writes the built-in GPT")
        raise UserError(f"{redact(run_dir)} trains {spec.entrypoint}: {what}; for your own model, use DeepSpeed's "
                        "zero_to_fp32.py in the checkpoint folder")
    if spec.hf is not None and fmt != "hf":
        raise UserError(f"{redact(run_dir)} trains the Hugging Face model {redact(spec.hf.path)}: export it with "
                        "--format hf (shardrun's own format holds the built-in GPT)")
    return spec


def job_yaml(run_dir: str) -> tuple[dict, str]:
    """The run's resolved spec as written (job.yaml in the run dir, local or behind a URI), and where it is (for
    messages, secrets masked)."""
    path = fs.join(run_dir if fs.is_uri(run_dir) else local_run_dir(run_dir), "job.yaml")
    try:
        text = fs.read_text(path)
    except OSError as e:
        raise UserError(f"{redact(path)}: cannot read it ({redact(str(e))})") from None
    if text is None:
        raise UserError(f"{redact(str(path))} is missing: it is written when a run starts; is {redact(run_dir)} "
                        "a run dir?")
    return yaml.safe_load(text), redact(path)


def consolidated_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint, ZeRO shards gathered (on the CPU)."""
    manifest = read_manifest(checkpoint_dir)
    tag = manifest["tag"]
    if manifest.get("zero_stage", 1) == 0:  # no ZeRO: one file holds the module
        [states] = Path(checkpoint_dir, tag).glob("mp_rank_*_model_states.pt")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils import zero_to_fp32

    zero_to_fp32.tqdm = lambda items, **_: items  # its progress bars, redrawn lines for a few seconds' work
    return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


@contextlib.contextmanager
def local_folder(run_dir: str, chosen: dict, emit: Callable[[str], None] = print) -> Iterator[str]:
    """The chosen checkpoint as a folder on this machine: itself, or, behind a URI, a download of it into a
    temporary folder (in TMPDIR; the whole checkpoint, optimizer state included: ZeRO keeps the fp32 weights
    there), removed afterwards."""
    if not fs.is_uri(run_dir):
        yield chosen["path"]
        return
    source, _ = fs.filesystem(run_dir)
    with tempfile.TemporaryDirectory(prefix=f"shardrun-step{chosen['step']}-") as tmp:
        emit(f"downloading checkpoint {chosen['step']} ({chosen['bytes'] / 1e6:,.1f} MB) from {chosen['path']} "
             f"to {tmp}")
        try:
            pafs.copy_files(chosen["fs_path"], tmp, source_filesystem=source,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        except OSError as e:
            raise UserError(f"{chosen['path']}: cannot download it ({redact(str(e))})") from None
        yield tmp


def export(run_dir: str, out: str, *, step: int | None = None, dtype: str = "fp32", fmt: str = "shardrun",
           max_shard_size: str | int | None = None, emit: Callable[[str], None] = print,
           trust: bool = False, merge: bool = False) -> dict:
    """Write out/model.safetensors and out/config.json from the run's newest (or a chosen) checkpoint, or with
    fmt "hf" a Hugging Face transformers folder (weights sharded above max_shard_size, default 5GB); the run
    dir may be local or behind a URI (abfs://, s3://). trust: load its files even where their pickles would
    call more than DeepSpeed's own classes (check_pickles). A model.lora run exports its adapters (peft's
    format), or with merge the base model with the adapters merged in."""
    from shardrun import hf_export

    if fmt not in FORMATS:
        raise UserError(f"--format is {' or '.join(FORMATS)} (got {fmt})")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype is fp32 or bf16 (got {dtype})")
    if max_shard_size is not None and fmt != "hf":
        raise UserError("--max-shard-size is for --format hf (shardrun's format is one file)")
    if merge and fmt != "hf":
        raise UserError("--merge is for --format hf (a model.lora run's base model with its adapters merged in)")
    shard_bytes = hf_export.parse_size(max_shard_size or "5GB")
    check_out(run_dir, out)
    spec = model_spec(run_dir, fmt)
    with contextlib.ExitStack() as stack:
        target = hf_export.prepare(spec, dtype, stack, emit, merge=merge) if fmt == "hf" else None
        chosen = pick(run_dir, step)
        with local_folder(run_dir, chosen, emit) as folder:
            if not trust:
                check_pickles(folder)
            state = consolidated_state(folder)
        config = {"model": spec.model_dump(mode="json"), "step": chosen["step"], "dtype": dtype,
                  "source": chosen["path"]}
        model = None if fmt == "hf" else _gpt(spec, state, dtype)
        if fs.is_uri(out):  # written here first, then uploaded
            staging = tempfile.mkdtemp(prefix="shardrun-export-")
        else:
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.staging-", dir=parent)
        try:
            if target is None:
                from safetensors.torch import save_model

                save_model(model, os.path.join(staging, "model.safetensors"))  # the tied embedding is stored once
                Path(staging, "config.json").write_text(json.dumps(config, indent=2) + "\n")
                size = os.path.getsize(os.path.join(staging, "model.safetensors"))
            else:
                size = hf_export.write(target, state, staging, dtype=dtype, max_shard_size=shard_bytes)
                files = sorted(os.listdir(staging))
                config = {**config, "format": "hf", "files": files,
                          **({"lora": "merged" if merge else "adapters"} if spec.lora is not None else {})}
                Path(staging, EXPORT_RECORD).write_text(redact(json.dumps(config, indent=2)) + "\n")  # hf.path
            if fs.is_uri(out):
                upload(staging, out, emit)
            else:
                fs.follow_umask(staging)  # mkdtemp's 0700 (and 0600 files): an export on shared storage is for others
                fs.sync_tree(staging)
                replace_folder(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"format": fmt, **config, "out": out, "bytes": size}


def _gpt(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: str):
    """The built-in GPT holding the checkpoint's weights."""
    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    model = GPT(gpt_config(spec))
    model.load_state_dict(state)
    return model.to(torch.bfloat16) if dtype == "bf16" else model


TRUSTED_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})
"""What DeepSpeed's checkpoint files name beyond torch's tensors and plain data: plain values, no behaviour."""


def check_pickles(folder: str) -> None:
    """Refuse a checkpoint whose DeepSpeed files would call anything but torch's tensors, plain data and
    TRUSTED_GLOBALS when loaded. DeepSpeed loads its files with a full unpickle: whoever can write the run's
    storage could otherwise run code here. Read from the opcodes alone (nothing is loaded to check)."""
    tag = read_manifest(folder)["tag"]
    for path in sorted(Path(folder, tag).rglob("*.pt")):  # the files export loads: DeepSpeed's
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - TRUSTED_GLOBALS
        if named:
            raise UserError(f"{path.relative_to(folder)} would call {', '.join(sorted(named))} when loaded: a "
                            "checkpoint that shardrun and DeepSpeed did not write alone. Check who can write the "
                            "run's storage; export it anyway, if you trust it, with --trust-checkpoint")


EXPORT_FILES = {"model.safetensors", "config.json"}
EXPORT_RECORD = "shardrun-export.json"
"""In a --format hf export: the step, dtype, source and run's model section, and the files the export wrote."""


def earlier_export(folder: str) -> bool:
    """folder holds an export and nothing else: shardrun's two files, or the files an hf export recorded."""
    names = set(os.listdir(folder))
    if names == EXPORT_FILES:
        return True
    try:
        recorded = json.loads(Path(folder, EXPORT_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(recorded, list) and names == {*map(str, recorded), EXPORT_RECORD}


def check_out(run_dir: str, out: str) -> None:
    """--out is a new or empty folder, or an earlier export (replaced whole); never inside the run dir."""
    if fs.is_uri(out):
        _check_out_uri(run_dir, out)
        return
    target = os.path.realpath(out)
    if not fs.is_uri(run_dir):
        run = os.path.realpath(os.path.expanduser(run_dir))
        if target == run or target.startswith(run + os.sep):
            raise UserError(f"--out {out} is inside the run dir {run_dir}: export to a folder of its own")
    if os.path.isfile(target):
        raise UserError(f"--out {out} is a file: give a folder (new, empty, or an earlier export)")
    if os.path.isdir(target) and os.listdir(target) and not earlier_export(target):
        raise UserError(f"--out {out} holds files that are no export ({', '.join(sorted(os.listdir(target)))}): "
                        "give a new or empty folder, or an earlier export to replace")


COMPLETES = ("config.json", "adapter_config.json", EXPORT_RECORD)
"""Written last to storage behind a URI, and taken away first from an earlier export there: a folder without them
is no (whole) export, and from_pretrained needs config.json (peft's, adapter_config.json)."""


def _listing(out: str) -> tuple[pafs.FileSystem, str, dict[str, int]]:
    """The filesystem, path and files (name: bytes) of the folder at out, a URI (no files: a new folder)."""
    storage, root = fs.filesystem(out)
    root = root.rstrip("/")
    try:
        infos = storage.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise UserError(f"--out {redact(out)}: cannot list it ({redact(str(e))})") from None
    return storage, root, {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _check_out_uri(run_dir: str, out: str) -> None:
    storage, base = fs.filesystem(out)
    run_storage, run = fs.filesystem(run_dir) if fs.is_uri(run_dir) else (pafs.LocalFileSystem(),
                                                                           os.path.realpath(run_dir))
    base, run = base.rstrip("/"), run.rstrip("/")
    if storage.type_name == run_storage.type_name and (base == run or base.startswith(run + "/")):
        raise UserError(f"--out {redact(out)} is inside the run dir {redact(run_dir)}: export to a folder of its own")
    _, root, names = _listing(out)
    if not names or set(names) == EXPORT_FILES:
        return
    if not set(names) & set(COMPLETES) and all(_written_by_export(n) for n in names):
        return  # an upload that stopped before its config.json
    record = fs.read_text(fs.join(out, EXPORT_RECORD)) if EXPORT_RECORD in names else None
    try:
        recorded = set(map(str, json.loads(record)["files"])) | {EXPORT_RECORD} if record else None
    except (ValueError, KeyError, TypeError):
        recorded = None
    if recorded != set(names):
        raise UserError(f"--out {redact(out)} holds files that are no export ({', '.join(sorted(names)[:8])}): give a "
                        "new or empty folder, or an earlier export to replace")


def _written_by_export(name: str) -> bool:
    from shardrun.hf_export import COPIED

    return name in COPIED or re.fullmatch(r"(adapter_)?model(-\d+-of-\d+)?\.safetensors(\.index\.json)?",
                                          name) is not None


def upload(staging: str, out: str, emit: Callable[[str], None]) -> None:
    """The folder staging to out (a URI), an earlier export there replaced: its config.json and record go first,
    the new weights are written, then the new config.json and record, and files of the earlier export that the
    new one lacks are removed. Object stores have no rename: in between, the folder is no loadable export."""
    storage, root, before = _listing(out)
    names = sorted(os.listdir(staging), key=lambda n: (n in COMPLETES, COMPLETES.index(n) if n in COMPLETES else 0, n))
    total = sum(os.path.getsize(os.path.join(staging, n)) for n in names)
    emit(f"uploading {len(names)} files ({total / 1e6:,.1f} MB) to {redact(out)}")
    try:
        for name in COMPLETES:
            if name in before:
                storage.delete_file(f"{root}/{name}")
        storage.create_dir(root, recursive=True)
        for name in names:
            with open(os.path.join(staging, name), "rb") as src, storage.open_output_stream(f"{root}/{name}") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        for name in set(before) - set(names):
            storage.delete_file(f"{root}/{name}")
    except OSError as e:
        raise UserError(f"--out {redact(out)}: cannot write there ({redact(str(e))}); what was written is no "
                        "export (no config.json): export again") from None


def replace_folder(new: str, target: str) -> None:
    """Put folder `new` in place of `target` by renames, never half an export: the old folder stays whole until
    the new one is complete (then it is removed)."""
    target = os.path.abspath(target)
    if os.path.isdir(target):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(aside, "old"))
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, target)
    fs.sync_dir(os.path.dirname(os.path.abspath(target)))
