#!/usr/bin/env bash
# The settings of this VM's Ray node that only the VM can know: the network interface for NCCL and gloo, and
# a temporary folder on the VM's temporary disk instead of the OS disk. ray-node.sh exports every line of
# /etc/shardrun/bootstrap.env before `ray start`, so Ray's processes (the job's ranks too) inherit them.
#
#   node-env.sh write     bootstrap.sh, as root, at the first boot of every VM (scale-set VMs added later too):
#                         adds each of these lines to the env file unless the file sets that key already (a
#                         value you put there stays):
#       NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME  the interface that holds this VM's IP (the address Ray binds),
#                         else the one of the default route: eth0 on Azure, not ib0, lo or docker0
#       TMPDIR=/mnt/shardrun-tmp  when the temporary (resource) disk is mounted at /mnt; without one, nothing
#                         (/tmp). shardrun's universal-checkpoint conversion and Ray Train's checkpoint staging
#                         use tempfile, so they go there
#       RAY_TMPDIR=/tmp   with TMPDIR: Ray's own folder stays /tmp/ray, where Prometheus and `ray` look for it
#   node-env.sh prepare   before each start of shardrun-ray.service (ExecStartPre=+, as root): creates TMPDIR,
#                         mode 1777 like /tmp, once its disk is mounted (a temporary disk is blank again after
#                         a deallocation or a move to another host)
#
# Both warn when the GPU's NVIDIA driver is too old for torch's CUDA 13 builds (check_nvidia_driver, lib.sh).
#
# Environment:
#   SHARDRUN_ENV_FILE     the env file (default /etc/shardrun/bootstrap.env); TMPDIR is read from it, never
#                         from this script's own environment
#   SHARDRUN_NODE_IP      this VM's IP (default: the primary private IP, from the metadata service)
#   SHARDRUN_TMP_MOUNT    where the temporary disk is mounted (default /mnt, where cloud-init mounts Azure's
#                         resource disk on Ubuntu)
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

mode=${1:-}
[[ $mode == write || $mode == prepare ]] || die "usage: node-env.sh write|prepare"
env_file=${SHARDRUN_ENV_FILE:-/etc/shardrun/bootstrap.env}
tmp_mount=${SHARDRUN_TMP_MOUNT:-/mnt}
added=0

# Prints the value of the last line of the env file that sets $1; fails when none does.
file_value() {
    local line
    [[ -f $env_file ]] || return 1
    line=$(grep -E "^$1=" "$env_file" | tail -n 1) || return 1
    printf '%s\n' "${line#*=}"
}

# Appends $1=$2 to the env file, unless the file sets $1 already.
add_default() {
    local key=$1 value=$2 given
    if given=$(file_value "$key"); then
        log "$env_file sets $key=$given already: kept"
        return 0
    fi
    if ((!added)); then
        printf '# Added by deploy/bootstrap/node-env.sh; edit a value to override it (it keeps what it finds).\n' >>"$env_file"
        added=1
    fi
    printf '%s=%s\n' "$key" "$value" >>"$env_file"
    log "$key=$value (added to $env_file)"
}

write_defaults() {
    local address ifname key
    address=$(node_ip 2>/dev/null) || address=''
    if ifname=$(socket_ifname "$address"); then
        for key in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
            add_default "$key" "$ifname"
        done
    elif ! file_value NCCL_SOCKET_IFNAME >/dev/null || ! file_value GLOO_SOCKET_IFNAME >/dev/null; then
        log "warning: no interface holds this VM's IP (${address:-unknown}) and there is no default route:" \
            "set NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME in $env_file, or multi-node runs may hang at start"
    fi
    if mountpoint -q "$tmp_mount"; then
        add_default TMPDIR "$tmp_mount/shardrun-tmp"
        add_default RAY_TMPDIR /tmp
    elif ! file_value TMPDIR >/dev/null; then
        log "no temporary disk is mounted at $tmp_mount: TMPDIR stays /tmp, on the OS disk"
    fi
}

prepare_tmpdir() {
    local dir
    dir=$(file_value TMPDIR) || return 0
    [[ -n $dir && $dir != /tmp ]] || return 0
    if [[ $dir == "$tmp_mount"/* ]] && ! mountpoint -q "$tmp_mount"; then
        log "warning: $tmp_mount is not mounted, so TMPDIR=$dir is not created: Ray's processes use /tmp this time"
        return 0
    fi
    if ! { mkdir -p "$dir" && chmod 1777 "$dir"; }; then
        log "warning: cannot create TMPDIR=$dir: Ray's processes use /tmp this time"
    fi
}

check_nvidia_driver
if [[ $mode == write ]]; then
    write_defaults
fi
prepare_tmpdir
