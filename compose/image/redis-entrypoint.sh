#!/bin/sh
# Redis for cipherpool: the password and the ACL go into a 0600 config file written at each
# start from the secret file, so neither shows in a process list or in `docker inspect`.
# The same rules as the embedded Redis of `cipherpool up` (cipherpool/stack/redis_server.py):
# AOF on, no RDB snapshots, maxmemory with noeviction (queued work is never dropped), and the
# commands that reconfigure, replicate, debug, stop or flush the server refused to every client.
set -eu

password_file="${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}"
if [ ! -s "$password_file" ]; then
    echo "redis-entrypoint: no password in $password_file (a compose secret)" >&2
    exit 1
fi
password="$(head -n 1 "$password_file" | tr -d '\r\n')"
case "$password" in
    *[!A-Za-z0-9_.-]*|"")
        echo "redis-entrypoint: use only letters, digits, '_', '-' and '.' in the Redis password" >&2
        exit 1 ;;
esac

refused="-config -module -debug -replicaof -slaveof -acl -failover -sync -psync -shutdown -save -bgsave -bgrewriteaof -flushall -flushdb"
umask 077
mkdir -p /run/redis /data
cat > /run/redis/redis.conf <<CONF
bind * -::*
port 6379
protected-mode yes
dir /data
appendonly yes
save ""
daemonize no
loglevel warning
maxmemory ${REDIS_MAXMEMORY:-4gb}
maxmemory-policy noeviction
user default on >$password ~* &* +@all $refused
CONF
unset password
chown -R redis:redis /run/redis /data
exec setpriv --reuid=redis --regid=redis --init-groups --no-new-privs -- redis-server /run/redis/redis.conf
