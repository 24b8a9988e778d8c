"""Pieces for running the platform as hosts apart on one machine, shared by
``tests/integration/test_hosts_apart.py`` and ``benchmarks/faults.py``: a node hook that holds
each query a while (so that a fault meets queries in progress), a Redis of the run's own that
listens on the host-side addresses of network namespaces (tests/netns.py), and a RabbitMQ
vhost of the run's own. Nothing here starts a platform process; each caller starts its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherpool.workers.hooks import Hook, QueryEvent

HOLD_ENV = "CIPHERPOOL_TEST_QUERY_HOLD_S"  # seconds HeldQuery holds each query (default below)
DEFAULT_HOLD_S = 0.5
RABBITMQ = ("127.0.0.1", 5672)  # the machine's RabbitMQ: guest/guest, loopback only


class HeldQuery(Hook):
    """A node hook (``CIPHERPOOL_NODE_HOOKS=tests.integration.hosts:HeldQuery``, the
    repository on the node's PYTHONPATH): each query holds its node ``CIPHERPOOL_TEST_QUERY_HOLD_S``
    (0.5 s) longer, as a heavier model's FHE run would. The breast-cancer model alone computes
    in about 30 ms, so a fault would almost never find a query that a node has taken and not
    finished, the very case that redelivery is there for. The answer is still the real FHE
    result. (Settings ignore the variable: it is read here, by the hook, at each query.)"""

    def query_authorised(self, query: QueryEvent) -> None:
        time.sleep(float(os.environ.get(HOLD_ENV, DEFAULT_HOLD_S)))


# --- Redis -----------------------------------------------------------------------------------


@dataclass
class OwnRedis:
    """The platform's Redis: password, append-only file, bound to loopback and to each address
    in ``bind`` (the host end of a namespace's veth pair: the address a process "on another
    host" uses)."""

    argv: list[str]
    port: int
    secret: str
    child: Any = None  # the supervisor's Child, once started

    def url(self, host: str = "127.0.0.1") -> str:
        return f"redis://:{self.secret}@{host}:{self.port}/0"

    def start(self, supervisor: Any, timeout_s: float = 30.0) -> OwnRedis:
        from cipherpool.waiting import wait_until

        self.child = supervisor.start("redis", self.argv, {"PATH": "/usr/bin:/bin"})

        def up() -> bool:
            if not self.child.alive():
                raise RuntimeError(f"redis-server exited at start; see {self.child.log_path}")
            return self.answers()

        wait_until(up, timeout_s, interval_s=0.05, error=RuntimeError(f"redis-server did not answer; see {self.child.log_path}"))
        return self

    def answers(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url(), socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or still loading the append-only file
            return False
        finally:
            client.close()


def own_redis(root: Path, bind: tuple[str, ...] = ()) -> OwnRedis:
    """A Redis configured (port, password, data directory ``root/redis``) but not started yet:
    the embedded stack's configuration, listening on ``bind`` besides loopback."""
    from cipherpool.files import private_dir
    from cipherpool.stack.redis_server import find_redis_server, write_config
    from cipherpool.stack.supervisor import free_port

    folder = root / "redis"
    private_dir(folder)
    port, secret = free_port(), uuid.uuid4().hex
    config = write_config(folder, port, secret, 512 * 1024**2)
    if bind:
        config.write_text(config.read_text().replace("bind 127.0.0.1", "bind 127.0.0.1 " + " ".join(bind)))
    return OwnRedis([find_redis_server(), str(config)], port, secret)


def start_redis(supervisor: Any, root: Path, bind: tuple[str, ...] = ()) -> OwnRedis:
    return own_redis(root, bind).start(supervisor)


# --- RabbitMQ --------------------------------------------------------------------------------


def listening(address: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(address) == 0


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True)


def rabbitmq_unavailable() -> str | None:
    """Why this machine's RabbitMQ cannot be used here (None: it can)."""
    if not shutil.which("rabbitmqctl"):
        return "no rabbitmqctl on PATH (a vhost of the run's own cannot be made)"
    if not listening(RABBITMQ):
        return f"no RabbitMQ on {RABBITMQ[0]}:{RABBITMQ[1]}"
    return None


@contextlib.contextmanager
def rabbitmq_vhost(prefix: str) -> Iterator[str]:
    """A vhost of this run's own on the machine's RabbitMQ, named ``prefix``, this process's id
    and a random part, guest allowed everything in it; deleted afterwards, with whatever queues
    it holds."""
    name = f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def remove_stale_vhosts(prefix: str) -> list[str]:
    """Delete the vhosts :func:`rabbitmq_vhost` made with ``prefix`` for a process that no
    longer runs (a run killed before its clean-up); a live run's vhost is left alone."""
    removed = []
    for name in rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").stdout.split():
        owner = name.removeprefix(prefix).split("_", 1)[0]
        if not name.startswith(prefix) or not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            rabbitmqctl("delete_vhost", name)
            removed.append(name)
        except PermissionError:  # alive, another user's
            pass
    return removed
