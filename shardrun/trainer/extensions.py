"""Where and with which ninja DeepSpeed builds the ops it compiles on first use (on CPU, its shared-memory comm
op: 25-100 s on 2 cores). Imports neither torch nor DeepSpeed: the benchmarks' parent processes use it too.

- One build folder per environment, kept between runs: the build command names the venv's include paths, so
  two venvs that shared a folder would rebuild in turn. The benchmarks build into the same folder.
- torch runs the `ninja` first on PATH. Ninja 1.13 (DeepSpeed's ninja package, in the venv) and 1.11 (a system
  one) log the same build command under different hashes, so each takes the other's build for a stale one and
  rebuilds: an activated venv and a plain `.venv/bin/python` took turns. This environment's ninja goes first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path


def default_dir() -> Path:
    """~/.cache/shardrun/torch_extensions/<a hash of this interpreter's prefix and torch version>."""
    torch = sys.modules.get("torch")  # (a torch built from source may have no package metadata)
    version = torch.__version__ if torch is not None else importlib.metadata.version("torch")
    key = hashlib.sha256(f"{sys.prefix} {version}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "shardrun" / "torch_extensions" / key


def path_with_our_ninja(path: str | None) -> str | None:
    """PATH with this interpreter's bin folder first, when a ninja is there (else PATH as it is)."""
    here = str(Path(sys.executable).parent)
    if not (Path(here) / "ninja").exists() or (path or "").split(os.pathsep)[0] == here:
        return path
    return os.pathsep.join(filter(None, [here, path]))


SHM_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU shared-memory comm op (its ShareMemCommBuilder's NAME)."""


def can_have_shm_op() -> bool:
    """Whether DeepSpeed's CPU shared-memory comm op is built already or can be: a C++ compiler on PATH, or its
    library in the build folder. Without either, DeepSpeed would fail at start on every rank; gloo alone works."""
    import shutil

    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", str(default_dir()))) / SHM_OP / f"{SHM_OP}.so"
    return built.exists() or shutil.which("c++") is not None


def choose_accelerator(use_gpu: bool) -> None:
    """Before DeepSpeed is imported: its CPU accelerator unless the spec asks for GPUs. DeepSpeed picks CUDA
    whenever a GPU is visible; with `use_gpu: false` on a GPU machine it would put the model there while the
    batches stay on the CPU. A DS_ACCELERATOR set by the user is kept."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare() -> None:
    """Before deepspeed is imported: TORCH_EXTENSIONS_DIR (unless set) and PATH, for this process and its
    children."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_dir()))
    path = path_with_our_ninja(os.environ.get("PATH"))
    if path is not None:
        os.environ["PATH"] = path
