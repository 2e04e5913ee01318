#!/usr/bin/env bash
# Head node only: Prometheus and Grafana with deploy/monitoring's configuration, both listening on
# 127.0.0.1 (reached through the SSH tunnel, never from the network).
#
#   Prometheus  Ubuntu's `prometheus` package; /etc/prometheus/prometheus.yml and rules/ from deploy/monitoring;
#               it scrapes every Ray node and every shardrun rank through the file_sd files under /tmp/ray
#   Grafana     the `grafana` package of Grafana's APT repository (Ubuntu has none); the Prometheus
#               datasource and the shardrun dashboard provisioned; anonymous users may view, the admin
#               password is random, in /etc/shardrun/grafana-admin-password (root and group grafana only)
#
# The targets folder /tmp/ray/shardrun/targets is made before Prometheus (re)starts, and again at every
# boot (tmpfiles.d): Prometheus does not watch a folder that did not exist when it started.
#
# Environment:
#   SHARDRUN_MONITORING_DIR     deploy/monitoring (default: next to this script's folder)
#   SHARDRUN_TARGETS_DIR        default /tmp/ray/shardrun/targets (metrics.targets_dir of the job specs)
#   SHARDRUN_USER               owner of /tmp/ray and the targets folder: the Ray service's user (default shardrun)
#   SHARDRUN_PROMETHEUS_LISTEN  default 127.0.0.1:9090
#   SHARDRUN_GRAFANA_ADDR       default 127.0.0.1 (port 3000)
#   SHARDRUN_GRAFANA_VERSION    an exact version of the grafana package (default: the repository's newest)
#   SHARDRUN_PROMTOOL           promtool, to check the installed configuration (default: promtool on PATH)
#   SHARDRUN_APT=0, SHARDRUN_NO_SYSTEMD=1, SHARDRUN_ROOT=DIR
#                               tests: install no package, touch no service, write every file under DIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

root=${SHARDRUN_ROOT:-}
monitoring=${SHARDRUN_MONITORING_DIR:-$SHARDRUN_BOOTSTRAP_DIR/../monitoring}
targets=${SHARDRUN_TARGETS_DIR:-/tmp/ray/shardrun/targets}
user=${SHARDRUN_USER:-shardrun}
no_systemd=${SHARDRUN_NO_SYSTEMD:-0}
[[ -f $monitoring/prometheus.yml ]] || die "no prometheus.yml in $monitoring"

install_packages() {
    local keyring=/etc/apt/keyrings/grafana.gpg
    [[ ${SHARDRUN_APT:-1} == 0 ]] && return 0
    apt_update
    apt_install prometheus ca-certificates curl gnupg
    if [[ ! -s $keyring ]]; then
        mkdir -p "$(dirname "$keyring")"
        curl --silent --show-error --fail https://apt.grafana.com/gpg.key | gpg --dearmor --yes -o "$keyring"
    fi
    printf 'deb [signed-by=%s] https://apt.grafana.com stable main\n' "$keyring" >/etc/apt/sources.list.d/grafana.list
    apt_update
    apt_install "grafana${SHARDRUN_GRAFANA_VERSION:+=$SHARDRUN_GRAFANA_VERSION}"
}

configure_prometheus() {
    local etc=$root/etc/prometheus rule
    install -d "$etc/rules"
    install -m 0644 "$monitoring/prometheus.yml" "$etc/prometheus.yml"
    for rule in "$monitoring"/rules/*.yml; do
        install -m 0644 "$rule" "$etc/rules/"
    done
    # Debian's unit runs `prometheus $ARGS`; its defaults (config, storage) stay, the listen address does not.
    write_if_changed "$root/etc/default/prometheus" 0644 <<EOF || true
# Written by deploy/bootstrap/monitoring.sh: only this host (and the SSH tunnel) reaches Prometheus.
ARGS="--web.listen-address=${SHARDRUN_PROMETHEUS_LISTEN:-127.0.0.1:9090} --storage.tsdb.retention.time=30d"
EOF
    # Debian's unit has PrivateTmp=true, which would hide the discovery files that Ray and shardrun write under /tmp/ray.
    write_if_changed "$root/etc/systemd/system/prometheus.service.d/shardrun.conf" 0644 <<EOF || true
# Written by deploy/bootstrap/monitoring.sh.
[Service]
PrivateTmp=false
EOF
    local promtool=${SHARDRUN_PROMTOOL:-promtool}
    if command -v "$promtool" >/dev/null; then
        "$promtool" check config "$etc/prometheus.yml" >&2
    else
        log "no promtool here; the configuration was not checked"
    fi
}

make_targets_dir() {
    # /tmp/ray belongs to the Ray service's user, so that Ray can make its session folders there.
    write_if_changed "$root/etc/tmpfiles.d/shardrun.conf" 0644 <<EOF || true
# Written by deploy/bootstrap/monitoring.sh: Ray's and shardrun's Prometheus discovery folders, made at boot.
d /tmp/ray 0755 $user $user -
d $(dirname "$targets") 0755 $user $user -
d $targets 0755 $user $user -
EOF
    if [[ $no_systemd == 1 ]]; then
        mkdir -p "$root$targets"
    else
        ensure_user "$user" /var/lib/shardrun
        systemd-tmpfiles --create "$root/etc/tmpfiles.d/shardrun.conf"
    fi
}

configure_grafana() {
    local grafana=$monitoring/grafana
    install -d "$root/etc/grafana/provisioning/datasources" "$root/etc/grafana/provisioning/dashboards"
    install -m 0644 "$grafana/provisioning/datasources/prometheus.yml" "$root/etc/grafana/provisioning/datasources/shardrun.yml"
    install -m 0644 "$grafana/provisioning/dashboards/shardrun.yml" "$root/etc/grafana/provisioning/dashboards/shardrun.yml"
    # The provider's options.path (deploy/monitoring/grafana/provisioning/dashboards/shardrun.yml).
    install -d "$root/var/lib/grafana/dashboards/shardrun"
    install -m 0644 "$grafana"/dashboards/*.json "$root/var/lib/grafana/dashboards/shardrun/"

    local password=$root/etc/shardrun/grafana-admin-password
    if [[ ! -s $password ]]; then
        install -d "$(dirname "$password")"
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24), end="")' >"$password")
    fi
    if getent group grafana >/dev/null; then
        chgrp grafana "$password"
        chmod 0640 "$password"
    fi
    write_if_changed "$root/etc/systemd/system/grafana-server.service.d/shardrun.conf" 0644 <<EOF || true
# Written by deploy/bootstrap/monitoring.sh: only this host (and the SSH tunnel) reaches Grafana.
[Service]
Environment=GF_SERVER_HTTP_ADDR=${SHARDRUN_GRAFANA_ADDR:-127.0.0.1}
Environment=GF_SERVER_HTTP_PORT=3000
# Grafana expands \$__file{...} in any setting; the admin password is set when Grafana first starts.
Environment=GF_SECURITY_ADMIN_PASSWORD=\$__file{/etc/shardrun/grafana-admin-password}
Environment=GF_AUTH_ANONYMOUS_ENABLED=true
Environment=GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer
# Ray's dashboard shows Grafana's panels in frames.
Environment=GF_SECURITY_ALLOW_EMBEDDING=true
Environment=GF_ANALYTICS_REPORTING_ENABLED=false
Environment=GF_ANALYTICS_CHECK_FOR_UPDATES=false
EOF
}

install_packages
make_targets_dir
configure_prometheus
configure_grafana
if [[ $no_systemd == 1 ]]; then
    log "configuration written under ${root:-/}; SHARDRUN_NO_SYSTEMD=1: no service started"
    exit 0
fi
systemctl_ daemon-reload
systemctl_ enable prometheus.service grafana-server.service
systemctl_ restart prometheus.service grafana-server.service
log "Prometheus on ${SHARDRUN_PROMETHEUS_LISTEN:-127.0.0.1:9090}, Grafana on ${SHARDRUN_GRAFANA_ADDR:-127.0.0.1}:3000"
