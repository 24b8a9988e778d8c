#!/bin/sh
# Makes the secret files compose/docker-compose.yml mounts (compose/secrets/, 0700; each file
# 0600), each a random value; an existing file is kept, so running it again changes nothing.
# To set one yourself, write it before the first `up` (one line; for Redis and PostgreSQL only
# letters, digits, '_', '-', '.'). flower_basic_auth is user:password.
set -eu
dir="${1:-$(dirname "$0")/secrets}"
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
random() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
for name in redis_password postgres_password metrics_token s3_secret_access_key flower_basic_auth; do
    [ -s "$dir/$name" ] && continue
    case "$name" in
        flower_basic_auth) printf 'admin:%s\n' "$(random)" > "$dir/$name" ;;
        *) printf '%s\n' "$(random)" > "$dir/$name" ;;
    esac
    echo "made $dir/$name"
done
