# shellcheck shell=bash
# Functions the bootstrap scripts share; each script sources this file (it runs nothing by itself).
#
# Every Azure-specific step is behind a variable so that the same scripts run on this machine's tests and
# inside network namespaces: SHARDRUN_IMDS_URL (the Instance Metadata Service), SHARDRUN_ENV_FILE (what
# cloud-init wrote), SHARDRUN_APT (0: install no system package), SHARDRUN_NO_SYSTEMD (1: no systemd),
# SHARDRUN_SYSTEMCTL (the systemctl command) and SHARDRUN_ROOT (a prefix for every system path written).

# shellcheck disable=SC2034  # used by the scripts that source this file
SHARDRUN_BOOTSTRAP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() {
    printf '[shardrun-bootstrap] %s: %s\n' "${0##*/}" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Exports KEY=VALUE lines of $SHARDRUN_ENV_FILE (default /etc/shardrun/bootstrap.env, written by cloud-init)
# for keys not already in the environment, so that a caller's setting wins. The file is parsed, never sourced:
# a value is the text after the first "=", taken literally.
load_env_file() {
    local file=${SHARDRUN_ENV_FILE:-/etc/shardrun/bootstrap.env}
    local line key value
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        [[ $line == *=* ]] || die "$file: not KEY=VALUE: $line"
        key=${line%%=*}
        value=${line#*=}
        [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$file: bad variable name: $key"
        if [[ -z ${!key+set} ]]; then
            export "$key=$value"
        fi
    done <"$file"
}

# GET a path of the Instance Metadata Service; prints the body. IMDS is never reached through a proxy.
imds_get() {
    local path=$1
    curl --silent --show-error --fail --noproxy '*' --max-time 10 -H 'Metadata: true' \
        "${SHARDRUN_IMDS_URL:-http://169.254.169.254}${path}"
}

# Prints the string field $1 of the JSON document on standard input.
json_field() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# Installs Debian/Ubuntu packages unless SHARDRUN_APT=0; waits for a dpkg lock that unattended-upgrades holds at boot.
apt_install() {
    if [[ ${SHARDRUN_APT:-1} == 0 ]]; then
        log "SHARDRUN_APT=0: not installing $*"
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@"
}

apt_update() {
    [[ ${SHARDRUN_APT:-1} == 0 ]] && return 0
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
}

systemctl_() {
    ${SHARDRUN_SYSTEMCTL:-systemctl} "$@"
}

# Writes standard input to $1 with mode $2 when its content changed; returns 1 when it was already the same.
write_if_changed() {
    local dest=$1 mode=$2 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dest"
}

# Creates the system user $1 (home $2) that runs Ray, unless it exists.
ensure_user() {
    local user=$1 home=$2
    id -u "$user" >/dev/null 2>&1 && return 0
    useradd --system --create-home --home-dir "$home" --shell /usr/sbin/nologin "$user"
}

# Prints this VM's IP, the address Ray binds: SHARDRUN_NODE_IP, else the primary private IP from the metadata
# service. Fails when neither gives one.
node_ip() {
    if [[ -n ${SHARDRUN_NODE_IP:-} ]]; then
        printf '%s\n' "$SHARDRUN_NODE_IP"
        return
    fi
    imds_get '/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text'
}

# Prints the network interface that holds the IPv4 address $1 (this VM's IP), else the one of the default
# route (`ip route get` only looks the route up: nothing is sent). Fails when it finds none, or only lo.
socket_ifname() {
    local address=${1:-} name=''
    if [[ -n $address ]]; then
        name=$(ip -o -4 addr show 2>/dev/null |
            awk -v address="$address" '{ split($4, a, "/"); if (a[1] == address) { print $2; exit } }') || name=''
    fi
    if [[ -z $name ]]; then
        name=$(ip -o -4 route get 1.1.1.1 2>/dev/null |
            awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }') || name=''
    fi
    name=${name%%@*}
    [[ -n $name && $name != lo ]] || return 1
    printf '%s\n' "$name"
}

# Warns when this VM's NVIDIA GPU cannot run torch's CUDA 13 builds (torch 2.11 and newer on PyPI): they need
# driver 580 or newer (SHARDRUN_MIN_NVIDIA_DRIVER), and compute capability 7.5 (Turing) or newer: no Volta
# (V100) or older. Quiet on a VM without nvidia-smi (SHARDRUN_NVIDIA_SMI, for tests); never fails.
check_nvidia_driver() {
    local min=${SHARDRUN_MIN_NVIDIA_DRIVER:-580} smi=${SHARDRUN_NVIDIA_SMI:-nvidia-smi} line name driver cap
    command -v "$smi" >/dev/null 2>&1 || return 0
    line=$("$smi" --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1) || line=''
    if [[ $line != *,* ]]; then
        log "note: nvidia-smi lists no GPU (a CPU VM, or the NVIDIA driver is not loaded)"
        return 0
    fi
    name=$(sed 's/^ *//; s/ *$//' <<<"${line%,*}")
    driver=$(tr -d ' ' <<<"${line##*,}")
    if [[ $driver =~ ^([0-9]+)\. ]] && ((BASH_REMATCH[1] < min)); then
        log "warning: the NVIDIA driver is $driver ($name), older than $min: torch 2.11 and newer are CUDA 13" \
            "builds and see no GPU with it. Deploy an image with driver $min or newer (imageVersion," \
            "docs/deploy-azure.md), or install a torch built for an older CUDA"
    fi
    cap=$("$smi" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ') || cap=''
    if [[ $cap =~ ^([0-9]+)\.([0-9]+)$ ]] && ((BASH_REMATCH[1] * 10 + BASH_REMATCH[2] < 75)); then
        log "warning: $name has compute capability $cap: torch's CUDA 13 builds (torch 2.11 and newer) support" \
            "7.5 (Turing) and newer only, not Volta (V100) or older. Use another VM size"
    fi
}
