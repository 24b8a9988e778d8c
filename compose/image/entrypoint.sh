#!/bin/sh
# cipherpool-entrypoint: the secrets, read from files into this process's environment (never on
# a command line, never in the container's configuration, so `docker inspect` shows none of
# them), then the command, as the cipherpool user.
#
#   /run/secrets/redis_password       -> CIPHERPOOL_BROKER_URL  redis://:<pw>@redis:6379/0
#   /run/secrets/postgres_password    -> CIPHERPOOL_DATABASE_URL postgresql+psycopg://cipherpool:<pw>@postgres:5432/cipherpool
#   /run/secrets/metrics_token        -> CIPHERPOOL_METRICS_TOKEN
#   /run/secrets/flower_basic_auth    -> FLOWER_BASIC_AUTH (user:password)
#   /run/secrets/s3_secret_access_key -> CIPHERPOOL_S3_SECRET_ACCESS_KEY
#
# A variable already set wins over its file. Hosts and names: REDIS_HOST (redis),
# POSTGRES_HOST (postgres), POSTGRES_USER and POSTGRES_DB (cipherpool).
# For a one-off command in a running container, go through this script:
#   docker compose exec gateway cipherpool-entrypoint cipherpool admin account create acme
set -eu

secrets="${SECRETS_DIR:-/run/secrets}"

secret() {  # the file's first line, without its line end; empty if there is no such file
    if [ -r "$secrets/$1" ]; then head -n 1 "$secrets/$1" | tr -d '\r\n'; fi
}

urlquote() {  # stdin -> percent-encoded, for a password inside a URL (stdin: not in any argv)
    python3 -c 'import sys, urllib.parse; sys.stdout.write(urllib.parse.quote(sys.stdin.read(), safe=""))'
}

if [ -z "${CIPHERPOOL_BROKER_URL:-}" ] && [ -n "$(secret redis_password)" ]; then
    CIPHERPOOL_BROKER_URL="redis://:$(secret redis_password | urlquote)@${REDIS_HOST:-redis}:${REDIS_PORT:-6379}/0"
    export CIPHERPOOL_BROKER_URL
fi
if [ -z "${CIPHERPOOL_DATABASE_URL:-}" ] && [ -n "$(secret postgres_password)" ]; then
    CIPHERPOOL_DATABASE_URL="postgresql+psycopg://${POSTGRES_USER:-cipherpool}:$(secret postgres_password | urlquote)@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}/${POSTGRES_DB:-cipherpool}"
    export CIPHERPOOL_DATABASE_URL
fi
for pair in metrics_token:CIPHERPOOL_METRICS_TOKEN flower_basic_auth:FLOWER_BASIC_AUTH \
            s3_secret_access_key:CIPHERPOOL_S3_SECRET_ACCESS_KEY; do
    file="${pair%%:*}" var="${pair#*:}"
    eval "current=\${$var:-}"
    value="$(secret "$file")"
    if [ -z "$current" ] && [ -n "$value" ]; then
        export "$var=$value"
    fi
done
unset pair file var current value

umask 077  # every file a platform process writes is private (as under `cipherpool up`)

if [ "$(id -u)" = 0 ]; then
    # Named volumes start empty and root-owned on some engines: the data directory and the
    # volumes mounted directly inside it belong to the cipherpool user.
    data="${CIPHERPOOL_DATA_DIR:-/var/lib/cipherpool}"
    mkdir -p "$data"
    chown cipherpool:cipherpool "$data"
    for sub in "$data"/*/; do
        [ -d "$sub" ] && chown cipherpool:cipherpool "$sub"
    done
    export HOME=/home/cipherpool USER=cipherpool LOGNAME=cipherpool
    exec setpriv --reuid=cipherpool --regid=cipherpool --init-groups --no-new-privs -- "$@"
fi
exec "$@"
