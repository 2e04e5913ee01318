#!/usr/bin/env bash
# Wheels that a GPU machine with PyTorch but no network needs to run bench/gpu.py (the worker loop
# without Ray), downloaded here into one folder that travels beside the working tree.
#
#     bench/gpu_bundle.sh [DIR]          # default .gpu-wheels (ignored by git)
#
# The target is the lent GPU machines' image (/work/.library/device/KINDS.md): CPython 3.12 on
# Linux x86_64 with torch, numpy, pyarrow, pyyaml, prometheus-client, packaging, psutil, py-cpuinfo,
# msgpack, ninja, einops, tqdm and typing-extensions already installed. Missing there: DeepSpeed and
# the parts of its and shardrun's needs that the image lacks (pydantic and what pydantic needs, hjson).
# typing-extensions comes along in case the image's is older than pydantic needs; bench/gpu.py
# --wheels installs only the wheels whose package is missing or older there (pip --no-deps).
#
# DeepSpeed is an sdist only on PyPI. Built with DS_BUILD_OPS=0 it is a pure-Python wheel
# (py3-none-any) that runs on any Python and torch, with no op prebuilt. bench/gpu.py needs none by
# default (shardrun's rows run torch's fused AdamW inside DeepSpeed); DeepSpeed's FusedAdam, asked for
# with --optimizers torch,deepspeed, is compiled on the GPU machine by its nvcc and ninja before its
# rows, or its rows are skipped where there is no nvcc. Versions come from constraints.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PYTHON=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}  # the GPU image's Python

pin() {  # the exact version constraints.txt pins for a distribution
    local v
    v=$(grep -i -E "^$1==" constraints.txt | head -n1 | cut -d= -f3)
    [ -n "$v" ] || { echo "gpu_bundle: $1 is not pinned in constraints.txt" >&2; exit 1; }
    echo "$1==$v"
}

rm -rf "$DEST"
mkdir -p "$DEST"

DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" "$(pin deepspeed)"

# pydantic-core is compiled; the rest are pure Python. --platform lists the manylinux tags a
# Linux x86_64 CPython takes (pip matches each tag exactly).
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)" "$(pin hjson)"

ls -l "$DEST"
du -sh "$DEST"
