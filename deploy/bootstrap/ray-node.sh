#!/usr/bin/env bash
# Runs this machine's Ray node of the shardrun cluster, with Ray's token authentication on.
#
#   ray-node.sh head|worker     installs and starts two systemd units (the default, on the VMs):
#       shardrun-ray-token.service  oneshot, as root: fetch-token.sh writes the token to a root-only file
#       shardrun-ray.service        `ray-node.sh ROLE` in the foreground as SHARDRUN_USER; systemd hands it the
#                                   token file as a credential (LoadCredential), readable by that service alone
#   SHARDRUN_NO_SYSTEMD=1 ray-node.sh head|worker
#                               execs `ray start --block ...` in the foreground (the unit above, a test,
#                               a network namespace); fetches the token first unless RAY_AUTH_TOKEN or a
#                               readable RAY_AUTH_TOKEN_PATH already provides it
#
# Ray's token authentication (Ray 2.60): RAY_AUTH_MODE=token on every node and every client; the token is
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `ray start` refuses to start
# without one (it generates tokens only for a local ray.init()).
#
# Environment:
#   SHARDRUN_HEAD_ADDRESS       the head's IP (workers; written by cloud-init)
#   SHARDRUN_NODE_IP            this node's IP (default: the VM's primary private IP, from IMDS)
#   SHARDRUN_VENV               the environment with ray (default /opt/shardrun/venv)
#   SHARDRUN_RAY_PORT           GCS port (default 6379)
#   SHARDRUN_DASHBOARD_HOST     head: the dashboard and Jobs API bind address (default 0.0.0.0; the network
#                               security group keeps it inside the virtual network, users come through SSH)
#   SHARDRUN_DASHBOARD_PORT     default 8265
#   SHARDRUN_METRICS_PORT       Ray's metrics export port on every node (default 8080)
#   SHARDRUN_RAY_ARGS           more `ray start` arguments, separated by spaces (e.g. --num-cpus=1 --temp-dir=/x)
#   SHARDRUN_TOKEN_FILE         where fetch-token.sh writes the token (default /etc/shardrun/ray-auth-token)
#   SHARDRUN_USER               the user the Ray service runs as (default shardrun, created when missing)
#   SHARDRUN_TMP_MOUNT          the temporary disk's mount point (default /mnt): the service starts after it
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, TMPDIR, RAY_TMPDIR   from bootstrap.env (node-env.sh writes them at
#                               first boot), inherited by Ray's processes; a TMPDIR that is not a writable
#                               folder is dropped (/tmp)
#   SHARDRUN_SYSTEMCTL, SHARDRUN_ROOT   tests: the systemctl command, a prefix for the unit files written
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

role=${1:-}
[[ $role == head || $role == worker ]] || die "usage: ray-node.sh head|worker"
venv=${SHARDRUN_VENV:-/opt/shardrun/venv}
token_file=${SHARDRUN_TOKEN_FILE:-/etc/shardrun/ray-auth-token}
ray_port=${SHARDRUN_RAY_PORT:-6379}

run_foreground() {
    local ip extra=()
    export RAY_AUTH_MODE=token
    if [[ -z ${RAY_AUTH_TOKEN:-} ]] && ! [[ -n ${RAY_AUTH_TOKEN_PATH:-} && -r $RAY_AUTH_TOKEN_PATH && -s $RAY_AUTH_TOKEN_PATH ]]; then
        "$SHARDRUN_BOOTSTRAP_DIR/fetch-token.sh"
        export RAY_AUTH_TOKEN_PATH=$token_file
    fi
    # Ray's dashboard draws its graphs from the head's Prometheus and Grafana (monitoring.sh).
    if [[ $role == head ]]; then
        export RAY_PROMETHEUS_HOST=${RAY_PROMETHEUS_HOST:-http://127.0.0.1:9090}
        export RAY_GRAFANA_HOST=${RAY_GRAFANA_HOST:-http://127.0.0.1:3000}
        export RAY_GRAFANA_IFRAME_HOST=${RAY_GRAFANA_IFRAME_HOST:-http://localhost:3000}
        # Ray Train's placement group cleaner runs here and asks the state API about the run's controller: name
        # this head's dashboard, not Ray's address file, which a --temp-dir in SHARDRUN_RAY_ARGS leaves elsewhere.
        local dashboard_host=${SHARDRUN_DASHBOARD_HOST:-0.0.0.0}
        [[ $dashboard_host == 0.0.0.0 ]] && dashboard_host=127.0.0.1
        export RAY_API_SERVER_ADDRESS=${RAY_API_SERVER_ADDRESS:-http://$dashboard_host:${SHARDRUN_DASHBOARD_PORT:-8265}}
    fi
    ip=$(node_ip) || die "cannot ask the metadata service for this VM's IP; set SHARDRUN_NODE_IP"
    # node-env.sh prepare creates TMPDIR (the temporary disk) before each start; without the disk, /tmp.
    if [[ -n ${TMPDIR:-} ]] && ! [[ -d $TMPDIR && -w $TMPDIR ]]; then
        log "warning: TMPDIR=$TMPDIR is not a writable folder (is the temporary disk mounted?): using /tmp"
        unset TMPDIR
    fi
    read -r -a extra <<<"${SHARDRUN_RAY_ARGS:-}"
    local argv=("$venv/bin/ray" start --block "--node-ip-address=$ip"
        "--metrics-export-port=${SHARDRUN_METRICS_PORT:-8080}" --disable-usage-stats)
    if [[ $role == head ]]; then
        argv+=(--head "--port=$ray_port" --include-dashboard=true
            "--dashboard-host=${SHARDRUN_DASHBOARD_HOST:-0.0.0.0}" "--dashboard-port=${SHARDRUN_DASHBOARD_PORT:-8265}")
    else
        [[ -n ${SHARDRUN_HEAD_ADDRESS:-} ]] || die "SHARDRUN_HEAD_ADDRESS is not set: where is the head?"
        argv+=("--address=$SHARDRUN_HEAD_ADDRESS:$ray_port")
    fi
    argv+=("${extra[@]}")
    log "starting the Ray $role at $ip: ${argv[*]}"
    exec "${argv[@]}"
}

install_units() {
    local user=${SHARDRUN_USER:-shardrun}
    local units=${SHARDRUN_ROOT:-}/etc/systemd/system
    local changed=0 tmp_mount=${SHARDRUN_TMP_MOUNT:-/mnt} tmp_mount_unit
    if command -v systemd-escape >/dev/null; then
        tmp_mount_unit=$(systemd-escape --path --suffix=mount "$tmp_mount")
    else
        tmp_mount_unit=${tmp_mount#/}
        tmp_mount_unit=${tmp_mount_unit//\//-}.mount
    fi
    ensure_user "$user" /var/lib/shardrun
    write_if_changed "$units/shardrun-ray-token.service" 0644 <<EOF && changed=1
# Written by deploy/bootstrap/ray-node.sh.
[Unit]
Description=shardrun: the Ray auth token from Key Vault (managed identity)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
# fetch-token.sh retries until the secret can be read (it may be created after the VMs boot).
TimeoutStartSec=infinity
Environment=SHARDRUN_TOKEN_FILE=$token_file
ExecStart=$SHARDRUN_BOOTSTRAP_DIR/fetch-token.sh

[Install]
WantedBy=multi-user.target
EOF
    write_if_changed "$units/shardrun-ray.service" 0644 <<EOF && changed=1
# Written by deploy/bootstrap/ray-node.sh.
[Unit]
Description=shardrun: Ray $role node (token authentication)
Requires=shardrun-ray-token.service
# The temporary disk (TMPDIR), when there is one: ordered after its mount, not requiring it.
After=shardrun-ray-token.service network-online.target $tmp_mount_unit
Wants=network-online.target

[Service]
User=$user
Group=$user
# The token file is root's; systemd copies it into this service's own credentials directory.
LoadCredential=ray-auth-token:$token_file
Environment=RAY_AUTH_TOKEN_PATH=%d/ray-auth-token
Environment=SHARDRUN_NO_SYSTEMD=1
Environment=SHARDRUN_VENV=$venv
# As root (+): creates TMPDIR on the temporary disk, which is blank after a deallocation; warns about an old
# NVIDIA driver. NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME and TMPDIR come from bootstrap.env (node-env.sh write).
ExecStartPre=+$SHARDRUN_BOOTSTRAP_DIR/node-env.sh prepare
ExecStart=$SHARDRUN_BOOTSTRAP_DIR/ray-node.sh $role
# A worker started before the head retries until the head answers.
Restart=always
RestartSec=10
TimeoutStopSec=90
# NCCL and RDMA pin memory; Ray opens many files.
LimitMEMLOCK=infinity
LimitNOFILE=1048576
# Prometheus (another user) reads the discovery files under /tmp/ray.
UMask=0022

[Install]
WantedBy=multi-user.target
EOF
    systemctl_ daemon-reload
    systemctl_ enable shardrun-ray-token.service shardrun-ray.service
    # --no-block: the token unit waits for the secret, and cloud-init must not wait with it.
    if ((changed)); then
        systemctl_ --no-block restart shardrun-ray.service
    else
        systemctl_ --no-block start shardrun-ray.service
    fi
    log "shardrun-ray.service ($role) is enabled; its log: journalctl -u shardrun-ray -u shardrun-ray-token"
}

if [[ ${SHARDRUN_NO_SYSTEMD:-0} == 1 ]]; then
    run_foreground
else
    install_units
fi
