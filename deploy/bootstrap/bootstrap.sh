#!/usr/bin/env bash
# What cloud-init runs on every VM of deploy/azure, once per instance (safe to run again):
#
#   bootstrap.sh head      install.sh, node-env.sh write, ray-node.sh head (systemd), monitoring.sh
#   bootstrap.sh worker    install.sh, node-env.sh write, ray-node.sh worker (systemd)
#
# node-env.sh adds this VM's NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME and TMPDIR (the temporary disk) to
# bootstrap.env, which the Ray node reads, and warns about an NVIDIA driver too old for torch's CUDA build.
#
# Settings come from /etc/shardrun/bootstrap.env (written by cloud-init from the template's parameters;
# no secret in it). Preemption needs nothing here: shardrun's workers watch Azure Scheduled Events
# themselves (failure.scheduled_events: auto), so this only checks that nothing blocks the metadata service.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

role=${1:-}
[[ $role == head || $role == worker ]] || die "usage: bootstrap.sh head|worker"

if ! imds_get '/metadata/instance/compute/vmId?api-version=2021-02-01&format=text' >/dev/null; then
    log "warning: the Instance Metadata Service (169.254.169.254) does not answer: no token, no Scheduled" \
        "Events (preemption notices) without it; check the firewall and proxy settings of this VM"
fi
"$SHARDRUN_BOOTSTRAP_DIR/install.sh"
"$SHARDRUN_BOOTSTRAP_DIR/node-env.sh" write
"$SHARDRUN_BOOTSTRAP_DIR/ray-node.sh" "$role"
if [[ $role == head ]]; then
    "$SHARDRUN_BOOTSTRAP_DIR/monitoring.sh"
fi
log "done: the Ray $role starts as soon as the Key Vault secret can be read (journalctl -u shardrun-ray-token)"
