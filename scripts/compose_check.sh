#!/usr/bin/env bash
# Checks compose/docker-compose.yml end to end on this machine, then tears it all down:
#
#   1. a Docker engine: the running one, else Debian's dockerd started here (its own sockets and
#      pidfile in a temporary folder, its data root in $CHECK_DIR/docker so that the
#      6 GB image layer is built once; stopped by its pid at the end);
#   2. the images: on the usual bases (python:3.11-slim, debian:bookworm-slim) where an image
#      registry answers, else on a Debian bookworm base made here with debootstrap from Debian's
#      packages (this machine's local CA certificates added, so pip and apt work as they do here);
#   3. the stack (with the "tls" profile) from fresh secrets, up in order; the gateway ready;
#   4. what the compose file promises: start order, secrets in no `docker inspect` and no
#      process list, Redis's ACL, the metrics token, Flower's login, HTTPS through the TLS front;
#   5. the end-user flow through the gateway, from a client container (compose/check/flow.py):
#      an account (the admin CLI in the gateway container), a model deployed, a worker, a
#      token, keys, encrypted predictions equal to the clear model's;
#   6. `docker kill` of the node that serves the model, the container recreated: the node comes
#      back under the same name and the model is served again (worker rebound or replaced),
#      and a query is answered; then a crash (SIGKILL from the host): Docker's restart policy
#      brings the node back, and again a query is answered; then a node left down past the
#      loss window: its worker is replaced on the other node, and the node comes back free;
#   7. `down -v`: containers, networks and volumes gone; with --clean, the images made too.
#
# Usage (as root, or a member of the docker group when an engine runs already):
#   bash scripts/compose_check.sh [--clean]
# Environment: CHECK_DIR (/var/tmp/cipherpool-compose-check), CHECK_BASE
# (auto | registry | debian), DEBIAN_MIRROR (debootstrap's default mirror if unset),
# STACK_TAG (check: the images' tag), CHECK_PROJECT (cipherpool-check).
# Prints PASS or FAIL for each check, with timings, and exits 0 only if every check passed.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMPOSE_DIR="$REPO/compose"
CHECK_DIR="${CHECK_DIR:-/var/tmp/cipherpool-compose-check}"
PROJECT="${CHECK_PROJECT:-cipherpool-check}"
BASE_MODE="${CHECK_BASE:-auto}"
export STACK_TAG="${STACK_TAG:-check}"
DEBIAN_BASE_IMAGE="cipherpool-base:bookworm"
CLEAN=0
for arg in "$@"; do
    case "$arg" in
        --clean) CLEAN=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

START="$(date +%s.%N)"
elapsed() { awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[%6ss] %s\n' "$(elapsed)" "$*"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

RESULTS=()   # "PASS|FAIL<TAB>check<TAB>detail"
FAILED=0
pass() { RESULTS+=("PASS	$1	${2:-}"); log "PASS  $1${2:+: $2}"; }
fail() { RESULTS+=("FAIL	$1	${2:-}"); FAILED=1; log "FAIL  $1${2:+: $2}"; }
TIMINGS=()   # "phase<TAB>seconds"
timed() { TIMINGS+=("$1	$2"); }

die() { fail "$1" "${2:-}"; exit 1; }

if [ "$(id -u)" != 0 ] && ! docker info >/dev/null 2>&1; then
    echo "compose_check: run as root (it may start dockerd and debootstrap a base image)" >&2
    exit 2
fi
for tool in docker curl python3 awk; do
    command -v "$tool" >/dev/null || { echo "compose_check: $tool is missing" >&2; exit 2; }
done

TMP="$(mktemp -d /tmp/cpcheck.XXXXXX)"
chmod 0700 "$TMP"
OWN_DOCKERD=""
HAD_DOCKER0=1
RUNNING=0

compose() {
    "${COMPOSE[@]}" -f "$COMPOSE_DIR/docker-compose.yml" -p "$PROJECT" "$@"
}

show_logs() {  # the last lines of each service, when something failed
    log "last log lines of each service (full logs: $TMP/stack.log):"
    compose logs --no-color --timestamps >"$TMP/stack.log" 2>&1 || true
    for svc in redis postgres migrate gateway control node1 node2 beat flower tls; do
        grep -a "^${svc}_1 " "$TMP/stack.log" | tail -n 8 || true
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ "$RUNNING" = 1 ]; then
        [ "$FAILED" = 1 ] && show_logs
        local t
        t="$(date +%s.%N)"
        docker rm -f "$PROJECT-client" >/dev/null 2>&1
        compose down -v --remove-orphans >"$TMP/down.log" 2>&1
        local left
        left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)"
        left_volumes="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)"
        if [ "$left" = 0 ] && [ "$left_volumes" = 0 ]; then
            pass "teardown" "down -v: no container, network or volume of $PROJECT left ($(since "$t") s)"
        else
            fail "teardown" "$left containers and $left_volumes volumes of $PROJECT left"
        fi
    fi
    if [ "$CLEAN" = 1 ]; then
        docker rmi "cipherpool:$STACK_TAG" "cipherpool-redis:$STACK_TAG" "cipherpool-postgres:$STACK_TAG" \
            "cipherpool-caddy:$STACK_TAG" "$DEBIAN_BASE_IMAGE" >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1
        log "removed the images this check made"
    fi
    if [ -n "$OWN_DOCKERD" ]; then
        kill "$OWN_DOCKERD" 2>/dev/null
        for _ in $(seq 1 60); do kill -0 "$OWN_DOCKERD" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$OWN_DOCKERD" 2>/dev/null && kill -9 "$OWN_DOCKERD"
        log "stopped the dockerd this check started (pid $OWN_DOCKERD)"
        # dockerd leaves its default bridge behind: remove it if this check made it.
        [ "$HAD_DOCKER0" = 0 ] && command -v ip >/dev/null && ip link delete docker0 2>/dev/null
        [ "$CLEAN" = 1 ] && rm -rf "$CHECK_DIR/docker"
    fi
    rm -rf "$TMP"
    summary
    [ "$FAILED" = 0 ] && [ "$rc" = 0 ] && exit 0
    exit 1
}

summary() {
    echo
    echo "=== compose check summary ==="
    for row in "${TIMINGS[@]}"; do
        IFS=$'\t' read -r phase seconds <<<"$row"
        printf '  %-44s %8s s\n' "$phase" "$seconds"
    done
    printf '  %-44s %8s s\n' "total" "$(elapsed)"
    echo
    for row in "${RESULTS[@]}"; do
        IFS=$'\t' read -r verdict check detail <<<"$row"
        printf '  %-4s  %-28s %s\n' "$verdict" "$check" "$detail"
    done
    echo
    if [ "$FAILED" = 0 ]; then echo "compose check: PASS"; else echo "compose check: FAIL"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the engine ------------------------------------------------------------------------
t="$(date +%s.%N)"
if docker info >/dev/null 2>&1; then
    log "using the running Docker engine ($(docker version --format '{{.Server.Version}}'))"
else
    command -v dockerd >/dev/null || die "engine" "no Docker engine runs and there is no dockerd (apt-get install docker.io)"
    if pgrep -f -- "--data-root $CHECK_DIR/docker" >/dev/null; then
        die "engine" "another dockerd uses $CHECK_DIR/docker: stop it, or set CHECK_DIR"
    fi
    mkdir -p "$CHECK_DIR/docker"
    HAD_DOCKER0=0
    [ -e /sys/class/net/docker0 ] && HAD_DOCKER0=1
    dockerd --data-root "$CHECK_DIR/docker" --exec-root "$TMP/exec" --pidfile "$TMP/dockerd.pid" \
        --host "unix://$TMP/docker.sock" >"$TMP/dockerd.log" 2>&1 &
    OWN_DOCKERD=$!
    export DOCKER_HOST="unix://$TMP/docker.sock"
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$OWN_DOCKERD" 2>/dev/null || { tail -n 20 "$TMP/dockerd.log"; die "engine" "dockerd exited at start"; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || die "engine" "dockerd did not answer within 60 s"
    log "started dockerd $(docker version --format '{{.Server.Version}}') (pid $OWN_DOCKERD, data root $CHECK_DIR/docker)"
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    die "engine" "neither 'docker compose' nor docker-compose (apt-get install docker-compose)"
fi
log "compose: ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null || true)"
timed "engine" "$(since "$t")"

# --- 2. the images ------------------------------------------------------------------------
t="$(date +%s.%N)"
if [ "$BASE_MODE" = auto ]; then
    if docker image inspect python:3.11-slim debian:bookworm-slim >/dev/null 2>&1 ||
       { timeout 120 docker pull -q debian:bookworm-slim >/dev/null 2>&1 && timeout 600 docker pull -q python:3.11-slim >/dev/null 2>&1; }; then
        BASE_MODE=registry
    else
        BASE_MODE=debian
    fi
fi
if [ "$BASE_MODE" = registry ]; then
    export STACK_PYTHON_BASE=python:3.11-slim STACK_DEBIAN_BASE=debian:bookworm-slim
    log "bases: python:3.11-slim and debian:bookworm-slim"
else
    export STACK_PYTHON_BASE="$DEBIAN_BASE_IMAGE" STACK_DEBIAN_BASE="$DEBIAN_BASE_IMAGE"
    if docker image inspect "$DEBIAN_BASE_IMAGE" >/dev/null 2>&1; then
        log "base: $DEBIAN_BASE_IMAGE (made by an earlier run)"
    else
        command -v debootstrap >/dev/null || die "base image" "no image registry and no debootstrap (apt-get install debootstrap)"
        log "no image registry: making $DEBIAN_BASE_IMAGE with debootstrap (Debian bookworm, python3, venv)"
        rootfs="$TMP/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$TMP/debootstrap.log" 2>&1 ||
            { tail -n 20 "$TMP/debootstrap.log"; die "base image" "debootstrap failed"; }
        # This machine's own CAs (a TLS-inspecting proxy's, a company's): pip and apt inside
        # the images then trust what this machine trusts.
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
        tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' - "$DEBIAN_BASE_IMAGE" >/dev/null
        rm -rf "$rootfs"
        log "made $DEBIAN_BASE_IMAGE in $(since "$t") s"
    fi
fi
timed "base image" "$(since "$t")"

export COMPOSE_PROFILES=tls
export STACK_SECRETS_DIR="$TMP/secrets"
sh "$COMPOSE_DIR/secrets.sh" "$STACK_SECRETS_DIR" >/dev/null
# Four distinct free ports on loopback (held together while chosen).
read -r GATEWAY_PORT FLOWER_PORT TLS_PORT TLS_HTTP_PORT < <(python3 -c '
import socket
held = [socket.socket() for _ in range(4)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')
export STACK_GATEWAY_PUBLISH="127.0.0.1:$GATEWAY_PORT" STACK_FLOWER_PUBLISH="127.0.0.1:$FLOWER_PORT" \
       STACK_TLS_PUBLISH="127.0.0.1:$TLS_PORT" STACK_TLS_HTTP_PUBLISH="127.0.0.1:$TLS_HTTP_PORT"
GATEWAY="http://127.0.0.1:$GATEWAY_PORT"

t="$(date +%s.%N)"
log "building the images (tag $STACK_TAG; log in $TMP/build.log; the first build installs concrete-ml and torch: minutes)"
if compose build redis postgres migrate tls >"$TMP/build.log" 2>&1; then
    size="$(docker image inspect -f '{{.Size}}' "cipherpool:$STACK_TAG" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
    pass "build" "cipherpool $size, redis, postgres, caddy in $(since "$t") s"
else
    tail -n 30 "$TMP/build.log"
    die "build" "compose build failed"
fi
timed "build (images)" "$(since "$t")"

# --- 3. up ----------------------------------------------------------------------------------
RUN_START="$(date +%s.%N)"
t="$RUN_START"
RUNNING=1
compose up -d --no-build >"$TMP/up.log" 2>&1 || { cat "$TMP/up.log"; die "up" "compose up failed"; }
log "compose up -d returned after $(since "$t") s; waiting for $GATEWAY/v1/ready"
ready=""
for _ in $(seq 1 300); do
    ready="$(curl -fsS -m 5 "$GATEWAY/v1/ready" 2>/dev/null)" && break
    ready=""
    sleep 1
done
[ -n "$ready" ] || die "up" "the gateway was not ready within 300 s"
pass "up and ready" "/v1/ready 200 $(sed -E 's/.*"status":"([a-z]+)".*/\1/' <<<"$ready") after $(since "$t") s"
timed "up -> gateway ready" "$(since "$t")"

# --- 4. what the compose file promises ------------------------------------------------------
t="$(date +%s.%N)"
cid() { compose ps -q "$1"; }
started() { docker inspect -f '{{.State.StartedAt}}' "$1"; }
START_ORDER_PY="$(cat <<'EOF'
import sys
from datetime import datetime

def at(text):  # RFC 3339 with nanoseconds -> datetime (microseconds)
    day, _, rest = text.rstrip("Z").partition("T")
    clock, _, fraction = rest.partition(".")
    return datetime.fromisoformat(f"{day}T{clock}.{(fraction + '000000')[:6]}")

rows = {svc: (at(start), at(end), code) for svc, start, end, code in (line.split() for line in sys.stdin)}
_, migrated, code = rows.pop("migrate")
postgres = rows.pop("postgres")[0]
after = sorted(svc for svc, (start, _, _) in rows.items() if start > migrated)
ok = code == "0" and len(after) == len(rows)
print(("ok " if ok else "bad ") + f"postgres up, then migrate exited {code} {(migrated - postgres).total_seconds():.1f} s later, "
      + f"then started: {', '.join(after) or 'none'}")
EOF
)"
order="$(for svc in postgres migrate gateway control node1 node2 beat flower; do
    c="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$svc")"
    docker inspect -f "$svc {{.State.StartedAt}} {{.State.FinishedAt}} {{.State.ExitCode}}" "$c"
done | python3 -c "$START_ORDER_PY")"
if [ "${order%% *}" = ok ]; then
    pass "start order" "${order#* }"
else
    fail "start order" "${order#* }"
fi

# Pool nodes: registered under their stable names (the operator's view, from the database).
nodes=""
for _ in $(seq 1 60); do
    nodes_json="$(compose exec -T gateway cipherpool-entrypoint cipherpool pool nodes --all --json 2>/dev/null || true)"
    nodes="$(python3 -c 'import json, sys; print(" ".join(sorted(n["name"] + "=" + n["status"] for n in json.load(sys.stdin))))' <<<"$nodes_json" 2>/dev/null || true)"
    [[ "$nodes" == *"node1@compose=online"* ]] && [[ "$nodes" == *"node2@compose=online"* ]] && break
    sleep 2
done
if [[ "$nodes" == *"node1@compose=online"* ]] && [[ "$nodes" == *"node2@compose=online"* ]]; then
    pass "nodes registered" "$nodes"
else
    fail "nodes registered" "${nodes:-none}"
fi

# Secrets: in no container's configuration (docker inspect) and in no process's argv.
{ cat "$STACK_SECRETS_DIR"/*; cut -d: -f2 "$STACK_SECRETS_DIR/flower_basic_auth"; } | grep -v '^$' >"$TMP/secret-values"
leaks=""
for c in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
    name="$(docker inspect -f '{{.Name}}' "$c")"
    if docker inspect "$c" | grep -qF -f "$TMP/secret-values"; then leaks="$leaks ${name#/}(inspect)"; fi
    if docker top "$c" -eo pid,args 2>/dev/null | grep -qF -f "$TMP/secret-values"; then leaks="$leaks ${name#/}(argv)"; fi
done
if [ -z "$leaks" ]; then
    pass "secrets hidden" "no secret in docker inspect or a process's argv of $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) containers"
else
    fail "secrets hidden" "found in:$leaks"
fi

redis_noauth="$(docker exec "$(cid redis)" redis-cli -h 127.0.0.1 ping 2>&1 || true)"
redis_config="$(docker exec "$(cid redis)" sh -c 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli -h 127.0.0.1 config get maxmemory' 2>&1 || true)"
redis_policy="$(docker exec "$(cid redis)" sh -c 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli -h 127.0.0.1 info memory' | tr -d '\r' | sed -n 's/^maxmemory_policy://p')"
if [[ "$redis_noauth" == *NOAUTH* ]] && [[ "$redis_config" == *NOPERM* ]] && [ "$redis_policy" = noeviction ]; then
    pass "redis acl" "no password: NOAUTH; CONFIG: NOPERM; maxmemory-policy $redis_policy"
else
    fail "redis acl" "ping: $redis_noauth | config: $redis_config | policy: $redis_policy"
fi

printf 'Authorization: Bearer %s\n' "$(cat "$STACK_SECRETS_DIR/metrics_token")" >"$TMP/metrics.header"
no_token="$(curl -sS -o /dev/null -w '%{http_code}' "$GATEWAY/metrics")"
with_token="$(curl -sS -o "$TMP/metrics.txt" -w '%{http_code}' -H @"$TMP/metrics.header" "$GATEWAY/metrics")"
nodes_online="$(awk '/^cipherpool_nodes_online\{/ { n += $2 } END { print n + 0 }' "$TMP/metrics.txt")"
if [ "$no_token" = 401 ] && [ "$with_token" = 200 ]; then
    pass "metrics token" "/metrics: 401 without it, 200 with it (cipherpool_nodes_online $nodes_online)"
else
    fail "metrics token" "/metrics: $no_token without the token, $with_token with it"
fi

printf 'user = "%s"\n' "$(cat "$STACK_SECRETS_DIR/flower_basic_auth")" >"$TMP/flower.curl"
flower_anon="" flower_auth=""
for _ in $(seq 1 60); do
    flower_anon="$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$FLOWER_PORT/" 2>/dev/null || true)"
    [ "$flower_anon" != 000 ] && break
    sleep 1
done
flower_auth="$(curl -sS -o /dev/null -w '%{http_code}' -K "$TMP/flower.curl" "http://127.0.0.1:$FLOWER_PORT/" 2>/dev/null || true)"
if [ "$flower_anon" = 401 ] && [ "$flower_auth" = 200 ]; then
    pass "flower login" "401 without the login, 200 with it (127.0.0.1 only)"
else
    fail "flower login" "without: $flower_anon, with: $flower_auth"
fi

tls_ready=""
for _ in $(seq 1 60); do
    if compose exec -T tls cat /data/caddy/pki/authorities/local/root.crt >"$TMP/caddy-root.crt" 2>/dev/null &&
       tls_ready="$(curl -fsS -m 5 --cacert "$TMP/caddy-root.crt" --resolve "localhost:$TLS_PORT:127.0.0.1" \
           "https://localhost:$TLS_PORT/v1/ready" 2>/dev/null)"; then
        break
    fi
    tls_ready=""
    sleep 1
done
if [ -n "$tls_ready" ]; then
    pass "tls front" "https://localhost:$TLS_PORT/v1/ready 200, certificate verified against Caddy's CA"
else
    fail "tls front" "no verified HTTPS answer from the tls service"
fi

timed "platform checks" "$(since "$t")"

# --- 5. the end-user flow ------------------------------------------------------------------
t="$(date +%s.%N)"
mkdir -m 0700 "$TMP/client" "$TMP/client/home"
compose exec -T gateway cipherpool-entrypoint cipherpool admin account create compose-check --json >"$TMP/account.json" ||
    die "account" "cipherpool admin account create failed"
(umask 077; python3 -c 'import json, sys; print(json.load(sys.stdin)["api_key"])' <"$TMP/account.json" >"$TMP/client/api_key")
rm -f "$TMP/account.json"
pass "account" "cipherpool admin account create (in the gateway container): API key handed to the client"
NETWORK="${PROJECT}_default"
FLOW_RESULT=""
flow() {  # a step of compose/check/flow.py in a client container; its last line (JSON) -> FLOW_RESULT
    docker run --rm --name "$PROJECT-client" --network "$NETWORK" --user "$(id -u):$(id -g)" \
        -e HOME=/state/home -e CIPHERPOOL_URL=http://gateway:8080 --entrypoint python3 \
        -v "$TMP/client:/state" -v "$COMPOSE_DIR/check:/check:ro" \
        "cipherpool:$STACK_TAG" /check/flow.py "$@" 2>&1 | tee "$TMP/flow.out" | grep -v '^{' || true
    FLOW_RESULT="$(tail -n 1 "$TMP/flow.out")"
}
json_field() { python3 -c 'import json, sys; print(json.loads(sys.stdin.read()).get(sys.argv[1], ""))' "$1" 2>/dev/null <<<"$2" || true; }

flow serve
result="$FLOW_RESULT"
if [ "$(json_field ok "$result")" = True ]; then
    pass "end-user flow" "deploy, worker on $(json_field node "$result"), token, keys, 3 predictions == clear ($(json_field predict_s "$result") s)"
else
    die "end-user flow" "$result"
fi
timed "end-user flow (train, deploy, keys, predict)" "$(since "$t")"

# --- 6. a node killed ------------------------------------------------------------------------
node_round() {  # $1: kill | crash
    local how="$1" node svc container new since_ts t result
    node="$(python3 -c 'import json; print(json.load(open("'"$TMP"'/client/state.json"))["node"])')"
    svc="${node%@*}"
    container="$(cid "$svc")"
    since_ts="$(date -u +%Y-%m-%dT%H:%M:%S)"
    t="$(date +%s.%N)"
    if [ "$how" = kill ]; then
        docker kill "$container" >/dev/null
        log "docker kill $svc (${container:0:12}), which holds the worker; recreating it: compose up -d --force-recreate $svc"
        compose up -d --no-build --no-deps --force-recreate "$svc" >>"$TMP/up.log" 2>&1
        new="$(cid "$svc")"
        [ "$new" != "$container" ] || { fail "node killed" "$svc was not recreated"; return; }
        log "$svc is a new container (${new:0:12}), hostname $(docker inspect -f '{{.Config.Hostname}}' "$new")"
    else
        local pid restarts
        pid="$(docker inspect -f '{{.State.Pid}}' "$container")"
        restarts="$(docker inspect -f '{{.RestartCount}}' "$container")"
        kill -9 "$pid"
        log "SIGKILL to $svc's init (host pid $pid): a crash; Docker's restart policy must restart it"
        for _ in $(seq 1 60); do
            [ "$(docker inspect -f '{{.RestartCount}}' "$container")" -gt "$restarts" ] && break
            sleep 1
        done
        log "$svc restarted by Docker (restart count $(docker inspect -f '{{.RestartCount}}' "$container"))"
    fi
    flow serving "$node" "$since_ts" 300
    result="$FLOW_RESULT"
    if [ "$(json_field ok "$result")" = True ]; then
        pass "node $how: rebinds" "$node back under its name after $(since "$t") s; $(json_field how "$result")"
        # the worker may be elsewhere now: the next round kills the node that holds it
        python3 - "$TMP/client/state.json" "$(json_field worker "$result")" "$(json_field on "$result")" <<'EOF'
import json, sys
path, worker, node = sys.argv[1:]
state = json.load(open(path))
state.update(worker=worker, node=node)
json.dump(state, open(path, "w"))
EOF
    else
        fail "node $how: rebinds" "$(json_field why "$result")"
        return
    fi
    flow predict
    result="$FLOW_RESULT"
    if [ "$(json_field ok "$result")" = True ]; then
        pass "node $how: query answered" "3 predictions == clear ($(json_field predict_s "$result") s), $(since "$t") s after the kill"
    else
        fail "node $how: query answered" "$result"
    fi
    timed "node $how -> serving and answered" "$(since "$t")"
}
node_round kill
node_round crash

# An outage longer than the loss window (3 heartbeats): the worker fails and beat's reconciler
# starts its replacement on the other node; the killed node, started again, is free.
t="$(date +%s.%N)"
node="$(python3 -c 'import json; print(json.load(open("'"$TMP"'/client/state.json"))["node"])')"
svc="${node%@*}"
since_ts="$(date -u +%Y-%m-%dT%H:%M:%S)"
docker kill "$(cid "$svc")" >/dev/null
log "docker kill $svc and leave it down: its worker must be replaced on another node"
flow serving "$node" "$since_ts" 180 --node-down
result="$FLOW_RESULT"
if [ "$(json_field ok "$result")" = True ]; then
    pass "node down: replaced" "$(json_field how "$result") on $(json_field on "$result") after $(since "$t") s"
    compose up -d --no-build --no-deps "$svc" >>"$TMP/up.log" 2>&1
    flow online "$node" 120
    result="$FLOW_RESULT"
    if [ "$(json_field ok "$result")" = True ]; then
        pass "node down: back" "$node online again under its name, $( [ -z "$(json_field worker "$result")" ] || [ "$(json_field worker "$result")" = None ] && echo free || echo "holding $(json_field worker "$result")")"
    else
        fail "node down: back" "$(json_field why "$result")"
    fi
    flow predict
    result="$FLOW_RESULT"
    if [ "$(json_field ok "$result")" = True ]; then
        pass "node down: query answered" "3 predictions == clear ($(json_field predict_s "$result") s)"
    else
        fail "node down: query answered" "$result"
    fi
else
    fail "node down: replaced" "$(json_field why "$result")"
fi
timed "node down past the loss window -> replaced" "$(since "$t")"

t="$(date +%s.%N)"
flow cleanup >/dev/null
result="$FLOW_RESULT"
[ "$(json_field ok "$result")" = True ] && log "provider: workers stopped, model deleted" || log "cleanup step: $result"
timed "run (up to the end of the checks)" "$(since "$RUN_START")"
