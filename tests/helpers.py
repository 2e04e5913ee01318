"""Test helpers: tiny job specs, free ports, subprocesses that always get cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from shardrun.net import free_port  # noqa: F401 - the tests' free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_spec(corpus: Path, storage: Path, **sections) -> dict:
    """A job spec small enough to train in seconds on CPU; sections override key by key."""
    spec = {
        "name": "tiny",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {"paths": [str(corpus)], "seq_len": 32},
        "deepspeed": {"zero_stage": 2, "micro_batch_size": 4,
                      "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage": str(storage), "every_steps": 5},
        "run": {"max_steps": 10, "log_every": 5},
        # tests serve metrics on loopback only and keep their target files to themselves
        "metrics": {"host": "127.0.0.1", "targets_dir": str(Path(storage) / "targets")},
        # no requests to Azure's metadata service, even when the tests run on an Azure VM
        "failure": {"scheduled_events": "off"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def child_env(**extra: str) -> dict:
    """The environment for a child: our venv first on PATH, a Ray token so none is written to ~/.ray."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_AUTH_TOKEN", "shardrun-tests-" + "0" * 32)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or child_env(), cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s; output:\n{out[-4000:]}") from None
    finally:
        kill_group(proc)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}; output:\n{out[-6000:]}")
    return result


def kill_group(proc: subprocess.Popen, grace: float = 0) -> None:
    """End whatever is left of the process group: SIGTERM and `grace` seconds first, then SIGKILL."""
    if grace:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_checkpoint(folder, step, *, world=2, ranks=(0, 1), manifest=True, tag=True, stage=2, data=None,
                     committed=True):
    """A checkpoint folder laid out as DeepSpeed and shardrun write it (ZeRO `stage`, `world` ranks, the data
    position `data` in the manifest), or with a part missing (a rank's file, the manifest, DeepSpeed's tag
    folder). A Ray checkpoint (checkpoint_<step>) gets its commit marker unless not `committed`."""
    folder.mkdir(parents=True)
    if manifest:
        (folder / "shardrun.json").write_text(json.dumps({"step": step, "tag": f"global_step{step}",
                                                          "world_size": world, "zero_stage": stage, "data": data}))
    for r in ranks:
        (folder / f"rank_{r}.pt").write_bytes(b"x" * 10)
    if tag:
        (folder / f"global_step{step}").mkdir()
        names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 \
            else ["mp_rank_00_model_states.pt"]
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)] if stage else []
        for name in names:
            (folder / f"global_step{step}" / name).write_bytes(b"y" * 20)
    if committed and folder.name.startswith("checkpoint_"):
        commit(folder)
    return folder


def commit(folder):
    """Write a Ray checkpoint folder's commit marker as rank 0 does once Ray Train committed it."""
    from shardrun import checkpoint_format as layout

    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / layout.COMMIT).write_text(json.dumps(layout.commit_record(int(folder.name.split("_")[1]), sizes)))


class Planted:
    """A pickle that runs a command when loaded (touches `marker`), as whoever can write a run's storage could
    plant one in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
