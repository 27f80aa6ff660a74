#!/bin/sh
# The container's entry point (under tini, PID 1):
#   no arguments, or options      exec gateway run -c $GATEWAY_CONFIG --role $GATEWAY_ROLE [options]
#   a command                     exec it: `gateway db migrate`, `gateway queue status`, sh
#
# GATEWAY_ROLE: ingest | worker | all (default).  GATEWAY_CONFIG: the config file.
# GATEWAY_KEY_SEED: a file holding the at-rest key file (a compose secret or a Kubernetes
# Secret).  The live key file (gateway.encryption_key_file) must be writable: `gateway keys
# rotate` and retention rewrite it.  So a secret only seeds it: when the config's key file
# does not exist yet it is installed from the seed, mode 0600; when it exists it is the
# newer one and is left alone.  Containers that start together on one key volume each
# install the same seed; the first link wins.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

config="${GATEWAY_CONFIG:-/etc/gateway/gateway.yaml}"
role="${GATEWAY_ROLE:-all}"
case "$role" in
    ingest | worker | all) ;;
    *)
        echo "gateway-entrypoint: GATEWAY_ROLE must be ingest, worker or all, not '$role'" >&2
        exit 64
        ;;
esac

if [ -n "${GATEWAY_KEY_SEED:-}" ]; then
    key=$(python3 - "$config" <<'PY'
import sys

from gateway.config import read_config
from gateway.errors import ConfigError

try:
    print(read_config(sys.argv[1]).key_file)
except ConfigError as exc:
    sys.exit("\n".join(exc.errors))
PY
    ) || exit 78
    if [ ! -e "$key" ]; then
        if [ ! -r "$GATEWAY_KEY_SEED" ]; then
            echo "gateway-entrypoint: cannot read the key seed $GATEWAY_KEY_SEED as uid $(id -u):" \
                "give the secret to that uid (deploy/README.md, \"Secrets\")" >&2
            exit 78
        fi
        umask 077
        mkdir -p "$(dirname "$key")"
        tmp="$key.seed.$$"
        cp "$GATEWAY_KEY_SEED" "$tmp"
        chmod 0600 "$tmp"
        sync "$tmp"
        ln "$tmp" "$key" 2>/dev/null || true
        rm -f "$tmp"
        sync "$(dirname "$key")"
        echo "{\"event\": \"keys.seeded\", \"level\": \"info\", \"key_file\": \"$key\"}"
    fi
fi

exec gateway run -c "$config" --role "$role" "$@"
