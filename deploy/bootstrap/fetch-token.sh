#!/usr/bin/env bash
# Fetches the Ray cluster's auth token from Key Vault with the VM's managed identity and writes it to a
# root-only file (mode 0600) that the Ray service reads through RAY_AUTH_TOKEN_PATH.
#
#   1. GET $SHARDRUN_IMDS_URL/metadata/identity/oauth2/token?resource=https://vault.azure.net  (an access token)
#   2. GET $SHARDRUN_KEY_VAULT_URL/secrets/$SHARDRUN_TOKEN_SECRET_NAME?api-version=7.4           (the secret)
#
# The token never appears in a command line, an environment variable or the log. Until it can be read (the
# identity is not assigned yet, the role assignment has not propagated, the secret does not exist yet) the
# script retries, with a delay doubling from SHARDRUN_RETRY_DELAY (2) up to SHARDRUN_RETRY_MAX_DELAY (60)
# seconds, SHARDRUN_TOKEN_ATTEMPTS times (0, the default: until it works).
#
# Environment:
#   SHARDRUN_KEY_VAULT_URL        https://<vault>.vault.azure.net (required unless SHARDRUN_TOKEN_SOURCE_FILE)
#   SHARDRUN_KEY_VAULT_NAME       instead of the URL: the vault's name, in Azure's public cloud
#   SHARDRUN_TOKEN_SECRET_NAME    the secret's name (default ray-auth-token)
#   SHARDRUN_IDENTITY_CLIENT_ID   client id of the user-assigned identity (default: the VM's only identity)
#   SHARDRUN_TOKEN_FILE           where to write the token (default /etc/shardrun/ray-auth-token)
#   SHARDRUN_IMDS_URL             default http://169.254.169.254
#   SHARDRUN_VAULT_RESOURCE       the token audience (default https://vault.azure.net; sovereign clouds differ)
#   SHARDRUN_TOKEN_SOURCE_FILE    tests only: copy the token from this file instead of asking Key Vault
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_env_file

token_file=${SHARDRUN_TOKEN_FILE:-/etc/shardrun/ray-auth-token}
secret_name=${SHARDRUN_TOKEN_SECRET_NAME:-ray-auth-token}
resource=${SHARDRUN_VAULT_RESOURCE:-https://vault.azure.net}
attempts=${SHARDRUN_TOKEN_ATTEMPTS:-0}
max_delay=${SHARDRUN_RETRY_MAX_DELAY:-60}
umask 077
mkdir -p "$(dirname "$token_file")"
response=
trap '[[ -z $response ]] || rm -f "$response"' EXIT

# Writes the token on standard input (trailing newlines dropped) to $token_file, atomically, mode 0600.
store_token() {
    local token tmp
    token=$(cat)
    if [[ -z $token || $token =~ [[:space:]] ]]; then
        log "the token is empty or contains whitespace; not using it"
        return 1
    fi
    tmp=$(mktemp "$token_file.XXXXXX")
    printf '%s' "$token" >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$token_file"
}

# One try: prints nothing, returns 0 when the token file was written.
fetch_once() {
    local query access_token status message
    query="api-version=2018-02-01&resource=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$resource")"
    if [[ -n ${SHARDRUN_IDENTITY_CLIENT_ID:-} ]]; then
        query+="&client_id=$SHARDRUN_IDENTITY_CLIENT_ID"
    fi
    if ! access_token=$(imds_get "/metadata/identity/oauth2/token?$query" | json_field access_token); then
        log "no access token from the metadata service yet (is the identity assigned to this VM?)"
        return 1
    fi
    # Key Vault's answer holds the secret: it stays next to the token file (root's), and goes at exit.
    response=$(mktemp "$token_file.response.XXXXXX")
    # The bearer token goes to curl on its standard input (-K -), never in its arguments.
    status=$(printf 'header = "Authorization: Bearer %s"\n' "$access_token" |
        curl --silent --show-error --max-time 20 -K - -o "$response" -w '%{http_code}' \
            "${SHARDRUN_KEY_VAULT_URL%/}/secrets/$secret_name?api-version=7.4") || status=000
    if [[ $status != 200 ]]; then
        message=$(python3 -c 'import json, sys; e = json.load(open(sys.argv[1]))["error"]; print(e.get("code", ""), e.get("message", ""))' "$response" 2>/dev/null || true)
        rm -f "$response"
        log "Key Vault answered HTTP $status for secret '$secret_name': ${message:-no error message}"
        return 1
    fi
    if json_field value <"$response" | store_token; then
        rm -f "$response"
        return 0
    fi
    rm -f "$response"
    return 1
}

if [[ -n ${SHARDRUN_TOKEN_SOURCE_FILE:-} ]]; then
    store_token <"$SHARDRUN_TOKEN_SOURCE_FILE" || die "no usable token in $SHARDRUN_TOKEN_SOURCE_FILE"
    log "token copied from $SHARDRUN_TOKEN_SOURCE_FILE to $token_file"
    exit 0
fi
if [[ -z ${SHARDRUN_KEY_VAULT_URL:-} && -n ${SHARDRUN_KEY_VAULT_NAME:-} ]]; then
    SHARDRUN_KEY_VAULT_URL=https://$SHARDRUN_KEY_VAULT_NAME.vault.azure.net
fi
[[ -n ${SHARDRUN_KEY_VAULT_URL:-} ]] || die "SHARDRUN_KEY_VAULT_URL is not set (cloud-init writes it to ${SHARDRUN_ENV_FILE:-/etc/shardrun/bootstrap.env})"

try=1
delay=${SHARDRUN_RETRY_DELAY:-2}
until fetch_once; do
    if ((attempts > 0 && try >= attempts)); then
        if [[ -s $token_file ]]; then
            log "giving up after $try tries; keeping the token already in $token_file"
            exit 0
        fi
        die "no token after $try tries"
    fi
    log "try $try failed; again in ${delay}s"
    sleep "$delay"
    try=$((try + 1))
    delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
done
log "token of secret '$secret_name' written to $token_file"
