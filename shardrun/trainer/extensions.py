"""Where DeepSpeed keeps the ops it compiles on first use (its CPU shared-memory comm op: about 100 s on 2 cores).

One folder per environment, kept between runs: torch rebuilds an op whenever its build command changes, and the
command names the venv's include paths, so two venvs that shared a folder would rebuild it in turn. The benches
use the same folder as the runner (bench/overhead.py), so a fresh checkout builds the op once, not once each.
Imports neither torch nor DeepSpeed: the benches' parent processes call it too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path


def default_dir() -> Path:
    """~/.cache/shardrun/torch_extensions/<this interpreter's prefix and torch version>."""
    key = hashlib.sha256(f"{sys.prefix} {importlib.metadata.version('torch')}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "shardrun" / "torch_extensions" / key


def keep_builds() -> str:
    """TORCH_EXTENSIONS_DIR, set to default_dir() unless it is set already; before deepspeed is imported."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_dir()))
