#!/bin/sh
# Makes the secrets deploy/compose/compose.yaml mounts, in ./secrets (never committed):
#   keys.json     the at-rest key file's seed (the gateway installs it on its key volume)
#   pg-password   PostgreSQL's password for the gateway role
#   server.pem, server.key, ca.pem (+ client.pem/.key)  DEVELOPMENT TLS material from
#                 `gateway certs dev`: replace them with your PKI's for production
# The gateway's files are made inside its image (it has the code that writes them; the
# image is built first when missing), without network, so nothing but the container tool
# is needed on the host.  Files that exist are kept.
#   ENGINE=podman ./init-secrets.sh        (default: docker)
set -eu
cd "$(dirname "$0")"
engine=${ENGINE:-docker}
image=${GATEWAY_IMAGE:-localhost/ai-gateway:0.1.0}
umask 077
mkdir -p secrets

if ! "$engine" image inspect "$image" >/dev/null 2>&1; then
    "$engine" compose build worker
fi

in_image() {
    "$engine" run --rm --network none --entrypoint /bin/sh "$image" -c "$1"
}

if [ ! -s secrets/keys.json ]; then
    in_image 'python3 -c "
import pathlib, sys
from gateway.security.crypto import KeyStore
path = pathlib.Path(\"/tmp/keys/keys.json\")
KeyStore.open(path)
sys.stdout.write(path.read_text())
"' > secrets/keys.json.new
    mv secrets/keys.json.new secrets/keys.json
    echo "secrets/keys.json: a new key file; back it up apart from the data (docs/operations.md)"
fi

if [ ! -s secrets/pg-password ]; then
    head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > secrets/pg-password
    echo "secrets/pg-password: a new random password"
fi

if [ ! -s secrets/server.pem ]; then
    in_image 'gateway certs dev /tmp/pki --host 127.0.0.1 --host localhost --host ingest \
        >/dev/null && tar -C /tmp/pki -cf - .' | tar --no-same-owner --no-overwrite-dir -C secrets -xf -
    echo "secrets/server.pem, server.key, ca.pem, client.pem, client.key: DEVELOPMENT certificates"
fi

# The gateway's containers run as uid 10001 and read the secrets as that user.  The
# PostgreSQL password is read by PostgreSQL's own user too (uid 999 in its image): that
# file is readable by every user, and the secrets folder (0700) keeps it to its owner on
# the host.
chmod 0700 secrets
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 secrets/*
    chmod 0400 secrets/*
    chmod 0444 secrets/pg-password
else
    chmod 0400 secrets/*
    chmod 0444 secrets/pg-password
    echo "not root: give the files to uid 10001 as your container tool maps it, e.g." \
        "'sudo chown 10001:10001 secrets/*' (Docker) or" \
        "'podman unshare chown 10001:10001 secrets/*' (rootless Podman)"
fi
