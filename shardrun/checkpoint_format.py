"""The checkpoint format, in one place: folder and file names, the manifest, what "complete" means, and the
listing of a run's checkpoints. No torch here: `shardrun runs` and `checkpoints` read it on any machine.

A run dir (`<checkpoint.storage>/<name>`, a path or URI) holds its checkpoints as
  checkpoint_<step:08d>/      written through Ray Train (`shardrun run`, `submit`)
  checkpoints/step_<step:08d>/ written by `shardrun train` (one process or torchrun), with `latest` naming
                               the newest committed one; `.staging-step_<step>` while it is written
and each checkpoint folder as
  shardrun.json            rank 0, after its other files: step, tokens, world size, ZeRO stage, precision,
                           DeepSpeed tag, data position
  rank_<r>.pt              every rank: train state, data position, its RNG states
  <tag>/...                DeepSpeed's model and (sharded) optimizer states
  commit.json              under Ray, rank 0, last, once Ray Train has committed the checkpoint (every rank's
                           upload done): every file's size

Committed means: under `shardrun train`, renamed into place (staging folders never match STEP_DIR); under
Ray, commit.json there with every file at its recorded size, or, for a checkpoint without one (the group
ended between Ray's commit and the marker; shardrun before markers), named in Ray's record of the run.
"""

from __future__ import annotations

import json
import math
import os
import re

import pyarrow.fs as pafs

from shardrun.errors import UserError, redact
from shardrun.fs import display_path, filesystem, is_uri

MANIFEST = "shardrun.json"
LOCAL_FOLDER = "checkpoints"
"""`shardrun train`'s checkpoints, under the run dir."""
LATEST = "latest"
"""In LOCAL_FOLDER: the name of the newest committed checkpoint."""
STAGING_PREFIX = ".staging-"
STEP_DIR = re.compile(r"^(?:checkpoint_|step_)(\d+)$")
"""A checkpoint folder, of either writer; group 1 is the step."""
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's committed checkpoints, in the run dir (written in place by Ray)."""
RUN_CHECKPOINTS = re.compile(rf"^(checkpoint_\d+|{LOCAL_FOLDER})$")
"""An entry of a run dir that holds checkpoints."""
COMMIT = "commit.json"
"""In a checkpoint folder written through Ray: the marker of its commit, with every file's size."""


ZERO_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?P<kind>optim|model)_states\.pt")
"""DeepSpeed's per-rank files in the tag folder: optimizer state shards (ZeRO 1-3), parameter shards (ZeRO 3)."""
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's whole-model file (ZeRO 0-2), written by rank 0."""


def ray_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def local_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def tag(step: int) -> str:
    """DeepSpeed's tag (its folder inside the checkpoint) for a step."""
    return f"global_step{step}"


def manifest(state: dict, *, world_size: int, zero_stage: int, precision: str, data: dict | None = None,
             eval_loss: float | None = None, base_model: dict | None = None) -> dict:
    """What rank 0 writes last into MANIFEST: the train state, the tag, how the checkpoint was written, the
    data position (the driver checks a resume against it before any worker starts), the held-out loss at its
    step, when there was an evaluation, and for a checkpoint of LoRA adapters alone the base model they need
    (ModelSpec.adapter_base)."""
    out = {**state, "tag": tag(state["step"]), "world_size": world_size, "zero_stage": zero_stage,
           "precision": precision, "data": data}
    if eval_loss is not None:
        out["eval_loss"] = eval_loss
    if base_model is not None:
        out["base_model"] = base_model
    return out


def base_model_mismatch(recorded: dict | None, wanted: dict | None, step: int) -> str | None:
    """Why a checkpoint cannot resume a spec's model (recorded: its manifest's base_model; wanted: the spec's
    ModelSpec.adapter_base), or None: adapters alone need the base they were trained on, and a whole model's
    checkpoint holds no adapters."""
    if recorded == wanted or (recorded and wanted and recorded["path"] == wanted["path"]
                              and recorded.get("revision") == wanted.get("revision")):
        return None
    if wanted is None:
        return (f"its checkpoint of step {step} holds LoRA adapters alone (on {recorded['path']}), and the spec trains "
                "every weight: resume with the model.lora it was trained with, or start over with --fresh")
    if recorded is None:
        return (f"its checkpoint of step {step} holds every weight of the model, and the spec trains model.lora "
                "adapters: drop model.lora to resume it, or start over with --fresh")
    return (f"its checkpoint of step {step} holds LoRA adapters trained on {_named(recorded)}, and the spec's base "
            f"model is {_named(wanted)}: adapters fit only the weights they were trained on; give that model.hf.path, "
            "or start over with --fresh")


def _named(base: dict) -> str:
    return base["path"] + (f" at revision {base['revision']}" if base.get("revision") else "")


def kept_steps(losses: dict[int, float | None], newest: int, keep: int) -> set[int]:
    """checkpoint.keep_best's retention, as Ray Train's with checkpoint_score_attribute eval_loss (min): the keep
    checkpoints of the lowest held-out loss (losses: step -> eval_loss, None where there was no evaluation, which
    ranks last; ties to the newer), and the newest."""
    ranked = sorted(losses, key=lambda step: (math.inf if losses[step] is None else losses[step], -step))
    return set(ranked[:keep]) | {newest}


def commit_record(step: int, sizes: dict[str, int]) -> dict:
    """What COMMIT holds: the step and every file's size (relative name -> bytes), the marker itself left out."""
    return {"step": step, "files": {name: size for name, size in sorted(sizes.items()) if name != COMMIT}}


def uncommitted_because(record: dict | None, sizes: dict[str, int], named_by_ray: bool) -> str:
    """Why a Ray checkpoint folder whose files are `sizes` is not committed; "" when it is. record: its
    COMMIT's content (None: there is none); named_by_ray: Ray's record of the run lists it."""
    if record is None:
        return "" if named_by_ray else ("not committed: no commit.json, and Ray's record of the run does not name "
                                        "it (a rank ended during its upload)")
    differ = sorted(name for name, size in record.get("files", {}).items() if sizes.get(name) != size)
    if differ:
        return f"files differ from its commit record (cut off or replaced): {differ[:5]}"
    return ""


def ray_committed(fs: pafs.FileSystem, root: str) -> set[str]:
    """The checkpoint folders that Ray's record of the run (RAY_SNAPSHOT) lists; none when it is missing or
    unreadable."""
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{RAY_SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
        return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def read_manifest(directory: str) -> dict:
    """The manifest of a checkpoint folder on this machine; a UserError if it is missing or unreadable."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {directory} has no readable {MANIFEST} ({e}); it is not a shardrun "
                        "checkpoint, or it was not completely written") from None


def incomplete_because(found: dict, sizes: dict[str, int]) -> str:
    """Why a checkpoint folder whose manifest is `found` and whose files are `sizes` (relative name -> bytes)
    is not complete; "" when it is. Complete: every rank's file and every rank's ZeRO shards there, and no file
    empty (a rank killed mid-write or mid-upload leaves one missing or truncated to nothing)."""
    world, tag_dir = found["world_size"], found["tag"] + "/"
    missing = [r for r in range(world) if rank_file(r) not in sizes]
    if missing:
        return f"rank files missing: {missing}"
    ours = {name: size for name, size in sizes.items() if name.startswith(tag_dir)}
    if not ours:  # object stores have no folders, only names with slashes
        return f"DeepSpeed's {found['tag']} folder is missing"
    shards: dict[str, set[int]] = {"optim": set(), "model": set()}
    for name in ours:
        match = ZERO_SHARD.fullmatch(name[len(tag_dir):])
        if match:
            shards[match["kind"]].add(int(match["rank"]))
    if not shards["model"] and f"{tag_dir}{MODEL_STATES}" not in ours:
        return f"DeepSpeed's model states are missing from {found['tag']}"
    stage = found.get("zero_stage", 0)
    for kind, required in (("optim", stage >= 1), ("model", stage == 3)):
        lacking = sorted(set(range(world)) - shards[kind]) if required or shards[kind] else []
        if lacking:
            return f"ZeRO {kind} shards of ranks {lacking} are missing from {found['tag']}"
    empty = sorted(name for name, size in sizes.items() if size == 0 and (name in ours or name.startswith("rank_")))
    if empty:
        return f"empty files (cut off while written): {empty}"
    return ""


def list_checkpoints(run_dir: str) -> list[dict]:
    """Every checkpoint folder of the run, oldest first: step, path, bytes, complete, and why not. The run dir
    may be local or behind a URI (abfs://, s3://): only file listings and the manifests are read."""
    if is_uri(run_dir):
        fs, root = filesystem(run_dir)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise UserError(f"{redact(run_dir)} is no run dir: RUN is <checkpoint.storage>/<name>")
    else:
        fs, root = pafs.LocalFileSystem(), local_run_dir(run_dir)
    found = []
    named_by_ray: set[str] | None = None  # read once, when a Ray checkpoint is met
    for parent in (root, f"{root.rstrip('/')}/{LOCAL_FOLDER}"):
        if fs.get_file_info(parent).type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(parent)):
            match = STEP_DIR.match(entry.base_name)
            if entry.type == pafs.FileType.Directory and match:
                through_ray = parent == root
                if through_ray and named_by_ray is None:
                    named_by_ray = ray_committed(fs, root)
                found.append(_describe(fs, entry.path, int(match[1]), run_dir,
                                       named_by_ray=entry.base_name in named_by_ray if through_ray else None))
    return sorted(found, key=lambda c: c["step"])


def local_run_dir(run_dir: str) -> str:
    """A run dir on this machine, absolute; a UserError if there is no such folder."""
    path = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isdir(path):
        raise UserError(f"{run_dir} is no run dir: RUN is <checkpoint.storage>/<name>, e.g. ~/shardrun/runs/gpt-stdlib")
    return path


def _describe(fs: pafs.FileSystem, path: str, step: int, source: str, *, named_by_ray: bool | None) -> dict:
    """named_by_ray: None for a checkpoint of `shardrun train` (its rename was its commit), else whether Ray's
    record lists it."""
    files = folder_sizes(fs, path)
    size = sum(files.values())
    info = {"step": step, "path": display_path(source, path), "bytes": size, "complete": False, "why": "",
            "fs_path": path}
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            found = json.loads(f.read())
    except (OSError, ValueError):
        info["why"] = f"no readable {MANIFEST} (rank 0 had not finished)"
        return info
    info["why"] = incomplete_because(found, files)
    if not info["why"] and named_by_ray is not None:
        info["why"] = uncommitted_because(_read_json(fs, f"{path}/{COMMIT}"), files, named_by_ray)
    if not info["why"]:
        info.update(complete=True, world_size=found["world_size"], zero_stage=found.get("zero_stage"),
                    precision=found.get("precision"), data=found.get("data"), eval_loss=found.get("eval_loss"),
                    base_model=found.get("base_model"))
    return info


def folder_sizes(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """Every file under a folder: relative name -> bytes."""
    return {f.path[len(path):].lstrip("/"): f.size for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File}


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pick(run_dir: str, step: int | None = None) -> dict:
    """The newest complete checkpoint, or the one of `step`."""
    complete = [c for c in list_checkpoints(run_dir) if c["complete"]]
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


def resume_from(recorded: int | None, complete: list[int]) -> int | None:
    """The step to resume from when the launcher's record names checkpoint `recorded` (None: no record, or
    none in it) and `complete` are the steps of the complete checkpoints in storage: None to take the record's,
    else the newest complete one (the record was lost or cut off, the run ended before it was written, or
    it names a checkpoint that is not complete)."""
    newest = max(complete, default=None)
    return None if newest is None or recorded == newest else newest


def step_of(path: str) -> int | None:
    """The step of a checkpoint folder from its name (either writer's), or None."""
    match = STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match[1]) if match else None


def newest_complete_step(run_dir: str) -> int | None:
    complete = [c["step"] for c in list_checkpoints(run_dir) if c["complete"]]
    return complete[-1] if complete else None
