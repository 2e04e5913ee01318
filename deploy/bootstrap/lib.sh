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
