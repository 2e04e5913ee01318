#!/usr/bin/env bash
# Installs shardrun into a virtual environment with the exact versions of constraints.txt (the same file CI
# installs with), unless that environment already has it.
#
#   - The venv has a stamp (a hash of SHARDRUN_SOURCE and the constraints; for a folder, of its files too, so
#     that a checkout copied again by `ray up` after a change is installed again) that matches: nothing to do.
#   - The venv exists without a stamp but has `ray` and `shardrun` (a development venv, a test): used as it is.
#   - Otherwise: create the venv with SHARDRUN_PYTHON (installed with apt when missing), pip install, stamp.
#
# Environment:
#   SHARDRUN_SOURCE        what pip installs, pinned: git+https://github.com/ORG/shardrun@v0.1.0, shardrun==0.1.0,
#                          a wheel's path or URL (required when an install is needed)
#   SHARDRUN_CONSTRAINTS   default: constraints.txt two folders up (the repository's, or its copy on the VM)
#   SHARDRUN_VENV          default /opt/shardrun/venv
#   SHARDRUN_PYTHON        default python3.11 (numpy 2.4 and pandas 3 of the constraints need Python 3.11+)
#   SHARDRUN_APT           0: do not apt-get install the Python when it is missing
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

venv=${SHARDRUN_VENV:-/opt/shardrun/venv}
python=${SHARDRUN_PYTHON:-python3.11}
constraints=${SHARDRUN_CONSTRAINTS:-$SHARDRUN_BOOTSTRAP_DIR/../../constraints.txt}
stamp=$venv/.shardrun-install

[[ -f $constraints ]] || die "no constraints file at $constraints"
if [[ ! -f $stamp && -x $venv/bin/ray && -x $venv/bin/shardrun ]]; then
    log "using the existing environment $venv as it is (it has ray and shardrun, and no install stamp)"
    exit 0
fi
[[ -n ${SHARDRUN_SOURCE:-} ]] || die "SHARDRUN_SOURCE is not set: what should pip install (e.g. git+https://github.com/ORG/shardrun@v0.1.0)?"
want=$({
    printf '%s\n' "$SHARDRUN_SOURCE"
    cat "$constraints"
    if [[ -d $SHARDRUN_SOURCE ]]; then  # a source folder: what is in it counts too
        (cd "$SHARDRUN_SOURCE" && find pyproject.toml shardrun -type f -name '*.py' -o -name pyproject.toml |
            LC_ALL=C sort | xargs sha256sum)
    fi
} | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    log "shardrun ($SHARDRUN_SOURCE) is already installed in $venv"
    exit 0
fi

if ! command -v "$python" >/dev/null; then
    log "$python is missing; installing it"
    apt_update
    apt_install "$python" "$python-venv"
    command -v "$python" >/dev/null || die "$python is not installed; set SHARDRUN_PYTHON to a Python 3.11 or newer"
fi
if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv"
fi
log "installing $SHARDRUN_SOURCE into $venv with the versions of $constraints"
"$venv/bin/python" -m pip install --no-input --disable-pip-version-check --quiet -c "$constraints" "$SHARDRUN_SOURCE"
"$venv/bin/python" -c 'import ray, shardrun; print("shardrun", shardrun.__version__, "ray", ray.__version__)'
printf '%s\n' "$want" >"$stamp"
log "installed"
