"""`cipherpool up` and the demo's stack: everything a single machine needs, as children.

Redis (only when no broker is configured), the database schema, one control worker, N pool
nodes, beat and Flower. Every child gets the same CIPHERPOOL_* environment, so it is exactly
what an operator would run by hand with `celery -A cipherpool.tasks ...`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import select

from cipherpool.config.settings import Settings, settings_env
from cipherpool.db import init_db, session_scope
from cipherpool.db.tables import NodeStatus, PoolNode
from cipherpool.errors import PlatformError
from cipherpool.names import CONTROL_QUEUE, POOL_QUEUE
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import Supervisor, free_port

READY_TIMEOUT_S = 120.0
CONTROL_CONCURRENCY = 4  # management tasks are short and mostly wait on I/O
CELERY = [sys.executable, "-m", "celery", "-A", "cipherpool.tasks"]


@dataclass
class StackOptions:
    workers: int = 2  # pool nodes
    node_concurrency: int = 1  # parallel queries per node
    beat: bool = True
    flower: bool = True
    loglevel: str = "INFO"


@dataclass
class EmbeddedStack:
    settings: Settings
    options: StackOptions = field(default_factory=StackOptions)
    broker_url: str = ""
    flower_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.settings.data_dir).expanduser().resolve()
        self.supervisor = Supervisor(self.data_dir / "logs")

    @property
    def node_names(self) -> list[str]:
        return [f"node{i + 1}@{_host()}" for i in range(self.options.workers)]

    def start(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.broker_url = self.settings.broker_url or ""
        if not self.broker_url:
            _, self.broker_url = start_redis(self.supervisor, self.data_dir / "redis")
        database_url = self.settings.effective_database_url()
        init_db(database_url)
        # Concrete leaves a directory in the temp folder for each circuit it loads: keep them
        # under the data directory and clear what an earlier run left there.
        tmp = self.data_dir / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        threads = self.settings.node_threads or max(
            1, (os.cpu_count() or 1) // (self.options.workers * self.options.node_concurrency)
        )
        self.env = {
            **os.environ,
            **settings_env(self.settings),
            "CIPHERPOOL_BROKER_URL": self.broker_url,
            "CIPHERPOOL_DATA_DIR": str(self.data_dir),
            "CIPHERPOOL_DATABASE_URL": database_url,
            "CIPHERPOOL_NODE_THREADS": str(threads),
            "TMPDIR": str(tmp),
        }
        self._start_workers()
        self._start_beat_and_flower()
        self._wait_ready(database_url)

    def _start_workers(self) -> None:
        quiet = ["--without-gossip", "--without-mingle", "--loglevel", self.options.loglevel]
        self.supervisor.start(
            "control",
            CELERY + ["worker", "-Q", CONTROL_QUEUE, "-P", "threads", "-c", str(CONTROL_CONCURRENCY),
                      "-n", f"control@{_host()}"] + quiet,
            self.env,
        )
        for name in self.node_names:
            self.supervisor.start(
                name.split("@")[0],
                CELERY + ["worker", "-Q", POOL_QUEUE, "-P", "threads", "-c", str(self.options.node_concurrency),
                          "-n", name] + quiet,
                self.env,
            )

    def _start_beat_and_flower(self) -> None:
        if self.options.beat:
            schedule = str(self.data_dir / "celerybeat-schedule")
            self.supervisor.start("beat", CELERY + ["beat", "-s", schedule, "--loglevel", self.options.loglevel], self.env)
        if self.options.flower:
            port = self.settings.flower_port or free_port()
            self.supervisor.start("flower", CELERY + ["flower", "--address=127.0.0.1", f"--port={port}"], self.env)
            self.flower_url = f"http://127.0.0.1:{port}"

    def _wait_ready(self, database_url: str) -> None:
        """Ready when the control worker answers a ping and every node has registered from
        the very process we started (matched by pid, so rows left by an earlier run of the
        same data directory do not count)."""
        from cipherpool.config.celery import create_app

        app = create_app(self.settings.model_copy(update={"broker_url": self.broker_url}), name="cipherpool-up")
        expected = {(c.name, c.pid) for c in self.supervisor.children if c.name.startswith("node")}
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                dead = self.supervisor.dead()
                if dead:
                    raise PlatformError(f"{dead[0].name} exited during start; see {dead[0].log_path}")
                with session_scope(database_url) as session:
                    rows = session.exec(select(PoolNode.name, PoolNode.pid).where(PoolNode.status == NodeStatus.ONLINE))
                    online = {(name.split("@")[0], pid) for name, pid in rows}
                if expected <= online and app.control.ping(destination=[f"control@{_host()}"], timeout=0.5):
                    return
                time.sleep(0.2)
        finally:
            app.close()
        raise PlatformError(f"The stack was not ready within {READY_TIMEOUT_S:g}s; see logs in {self.supervisor.log_dir}")

    def create_account(self, name: str) -> str:
        """A provider account in this stack's database; returns its API key (for demos and
        tests: an operator uses `cipherpool admin account create`)."""
        from cipherpool.services.accounts import create_account

        with session_scope(self.settings.effective_database_url()) as session:
            return create_account(session, name)[1]

    def describe(self) -> list[tuple[str, str]]:
        rows = [(c.name, f"pid {c.pid}") for c in self.supervisor.children]
        rows.append(("broker", self.broker_url))
        rows.append(("database", self.env.get("CIPHERPOOL_DATABASE_URL", "")))
        if self.flower_url:
            rows.append(("flower", self.flower_url))
        rows.append(("logs", str(self.supervisor.log_dir)))
        return rows

    def pids(self) -> list[int]:
        return [c.pid for c in self.supervisor.children]

    def stop(self) -> None:
        self.supervisor.stop_all()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _host() -> str:
    import socket

    return socket.gethostname()
