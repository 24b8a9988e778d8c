#!/bin/sh
# PostgreSQL for cipherpool from Debian's package. At first start (an empty data volume) it
# makes the cluster and the cipherpool role and database, with the password read from the
# secret file (fed to the server on stdin, never on a command line); then it runs the server.
# Local connections: the postgres superuser by peer only; over the network: scram-sha-256.
set -eu

bin=/usr/lib/postgresql/15/bin
data="${PGDATA:-/var/lib/postgresql/data}"
user="${POSTGRES_USER:-cipherpool}"
db="${POSTGRES_DB:-cipherpool}"
password_file="${POSTGRES_PASSWORD_FILE:-/run/secrets/postgres_password}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups --no-new-privs -- "$@"; }

mkdir -p "$data"
install -d -o postgres -g postgres -m 2775 /run/postgresql
chown postgres:postgres "$data"
chmod 0700 "$data"
if [ ! -s "$data/PG_VERSION" ]; then
    if [ ! -s "$password_file" ]; then
        echo "postgres-entrypoint: no password in $password_file (a compose secret)" >&2
        exit 1
    fi
    password="$(head -n 1 "$password_file" | tr -d '\r\n')"
    case "$password$user$db" in
        *[!A-Za-z0-9_.-]*)
            echo "postgres-entrypoint: use only letters, digits, '_', '-' and '.' in the password, user and database" >&2
            exit 1 ;;
    esac
    as_postgres "$bin/initdb" -D "$data" --username=postgres --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    printf "CREATE ROLE \"%s\" LOGIN PASSWORD '%s';\nCREATE DATABASE \"%s\" OWNER \"%s\";\n" "$user" "$password" "$db" "$user" \
        | as_postgres "$bin/postgres" --single -D "$data" postgres >/dev/null
    unset password
    cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '*'
password_encryption = scram-sha-256
CONF
    cat > "$data/pg_hba.conf" <<CONF
local all postgres peer
host all all all scram-sha-256
CONF
    echo "postgres-entrypoint: cluster made, role and database $db created"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups --no-new-privs -- "$bin/postgres" -D "$data"
