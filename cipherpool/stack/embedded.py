"""`cipherpool up` and the demo's stack: everything a single machine needs, as children.

Redis (only when no broker is configured; private: password, ACL, noeviction), the database
schema, the blob store (files under the data directory unless ``CIPHERPOOL_BLOB_STORE`` says
otherwise; blobs an older release left in Redis are moved there at start), one control
worker, N pool nodes, beat, Flower (basic auth) and the gateway. Every
child gets the same CIPHERPOOL_* environment, so it is exactly what an operator would run by
hand with `celery -A cipherpool.tasks ...` and `uvicorn ...`. When ready, the gateway's URL is
written to ``<data dir>/stack.json`` (0600), where clients on this machine find it.

One stack per data directory: it holds ``<data dir>/stack.lock`` (:mod:`cipherpool.stack.lock`)
while it runs, and a second one on the same directory is refused before it starts anything.
Flower's basic-auth login is generated once and kept in ``<data dir>/flower-login`` (0600): the
same across restarts of the same data directory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from sqlmodel import select

from cipherpool.config.profiles import load_profiles, node_command, node_environment
from cipherpool.config.settings import Settings, mask_url, settings_env
from cipherpool.db import init_db, session_scope
from cipherpool.db.tables import NodeStatus, PoolNode
from cipherpool.errors import CipherpoolError, ConfigurationError, PlatformError
from cipherpool.files import private_dir, private_sqlite, write_private
from cipherpool.names import CONTROL_QUEUE, POOL_QUEUE
from cipherpool.stack.lock import StackLock
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import PORT_MOVES, Child, Supervisor, free_port, port_taken
from cipherpool.waiting import wait_until

log = logging.getLogger("cipherpool.stack")
READY_TIMEOUT_S = 120.0
CONTROL_CONCURRENCY = 4  # management tasks are short and mostly wait on I/O
CELERY = [sys.executable, "-m", "celery", "-A", "cipherpool.tasks"]
GATEWAY = [sys.executable, "-m", "uvicorn", "--factory", "cipherpool.gateway.app:create_app"]
FLOWER = [sys.executable, "-m", "cipherpool", "flower"]
FLOWER_USER = "admin"
FLOWER_LOGIN_FILE = "flower-login"  # user:password, 0600, kept across restarts of the data dir


@dataclass
class StackOptions:
    """What the stack runs. ``nodes`` counts pool nodes: persistent `celery worker` processes on
    the pool queue. A *worker* is something else, a model's serving unit bound to a node by
    `start_worker`; hence the field is not called ``workers`` (that old name still works)."""

    nodes: int = 2  # pool nodes
    node_concurrency: int = 1  # parallel queries per node
    # Node profiles (names in the profiles file), one node per entry; when given, they replace
    # ``nodes`` and ``node_concurrency`` (a profile says its class, concurrency, threads, labels).
    profiles: list[str] = field(default_factory=list)
    beat: bool = True
    flower: bool = True
    loglevel: str = "INFO"
    workers: InitVar[int | None] = None  # deprecated name of nodes, kept so old callers still work

    def __post_init__(self, workers: int | None) -> None:
        if workers is not None:
            warnings.warn(
                "StackOptions(workers=) is deprecated; use nodes= (a worker is a model's serving unit).",
                DeprecationWarning,
                stacklevel=3,
            )
            self.nodes = workers


@dataclass
class Listener:
    """A child that serves on a port: how to start it on one, and what to record of it."""

    host: str
    argv: Callable[[int], list[str]]
    at: Callable[[int], None]  # records where it serves (the stack's URL for it)
    port: int = 0


@dataclass
class EmbeddedStack:
    settings: Settings
    options: StackOptions = field(default_factory=StackOptions)
    broker_url: str = ""
    gateway_url: str = ""
    flower_url: str | None = None
    flower_auth: str | None = None  # user:password, generated once per data dir (FLOWER_LOGIN_FILE)
    env: dict[str, str] = field(default_factory=dict)
    lock: StackLock | None = field(default=None, repr=False)  # held from start to stop

    def __post_init__(self) -> None:
        self.data_dir = Path(self.settings.data_dir).expanduser().resolve()
        self.blob_store = self.settings.blob_store or "fs"
        self.supervisor = Supervisor(self.data_dir / "logs")
        self._listeners: dict[str, Listener] = {}  # children on a port chosen here, by name
        self._port_moves = 0

    @property
    def node_names(self) -> list[str]:
        if self.options.profiles:
            return [f"node{i + 1}-{p}@{_host()}" for i, p in enumerate(self.options.profiles)]
        return [f"node{i + 1}@{_host()}" for i in range(self.options.nodes)]

    @property
    def client_settings(self) -> Settings:
        """Settings for a client of this stack: the gateway URL, no broker."""
        return self.settings.model_copy(update={"url": self.gateway_url, "broker_url": None})

    def start(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        private_dir(self.data_dir)
        self.lock = StackLock.acquire(self.data_dir)  # refused, naming it, while another stack runs here
        self.stack_file.unlink(missing_ok=True)  # a killed stack's: its gateway is gone
        self.broker_url = self.settings.broker_url or ""
        if not self.broker_url:
            _, self.broker_url = start_redis(
                self.supervisor, self.data_dir / "redis", maxmemory_bytes=self.settings.redis_maxmemory_bytes
            )
        database_url = self.settings.effective_database_url()
        private_sqlite(database_url)
        init_db(database_url)
        # Blobs in files under the data directory unless the operator chose another store: every
        # process of this stack runs on this machine, so they all see the same directory.
        self.blob_store = self.settings.blob_store or "fs"
        self._migrate_blobs(database_url)
        # Concrete leaves a directory in the temp folder for each circuit it loads: keep them
        # under the data directory and clear what an earlier run left there.
        tmp = self.data_dir / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(tmp)
        threads = self.settings.node_threads or max(
            1, (os.cpu_count() or 1) // (len(self.node_names) * self.options.node_concurrency)
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CIPHERPOOL_", "FLOWER_"))},
            **settings_env(self.settings),
            "CIPHERPOOL_BROKER_URL": self.broker_url,
            "CIPHERPOOL_DATA_DIR": str(self.data_dir),
            "CIPHERPOOL_DATABASE_URL": database_url,
            "CIPHERPOOL_BLOB_STORE": self.blob_store,
            "CIPHERPOOL_NODE_THREADS": str(threads),
            "TMPDIR": str(tmp),
        }
        s = self.settings  # never shown should a child log them (the Redis password: start_redis)
        self.supervisor.hide(s.s3_secret_access_key, s.metrics_token, s.token)
        self._start_control()
        self._start_nodes()
        self._start_beat_and_flower()
        self._start_gateway()
        self._wait_ready(database_url)
        self._write_stack_file()

    @property
    def platform_settings(self) -> Settings:
        """The settings every process of this stack runs with (its broker, its store): for an
        operator's command on this machine, a test or a benchmark looking behind the gateway."""
        return self.settings.model_copy(
            update={
                "broker_url": self.broker_url,
                "data_dir": self.data_dir,
                "blob_store": self.blob_store,
                "database_url": self.settings.effective_database_url(),
            }
        )

    def _migrate_blobs(self, database_url: str) -> None:
        """Blobs an older release kept in this stack's Redis move into the store (verified, then
        removed from Redis): `cipherpool store migrate --delete-source`, run once at start."""
        if self.blob_store == "redis" or not (self.settings.store_url or self.broker_url).startswith("redis"):
            return
        from cipherpool.blobs.migrate import migrate, referenced
        from cipherpool.store import BlobStore

        source = BlobStore.from_url(self.settings.store_url or self.broker_url)
        try:
            if not source.blobs():
                return
            target = BlobStore.from_settings(self.platform_settings)
            with session_scope(database_url) as session:
                refs = referenced(session)
            report = migrate(refs, source, target, delete_source=True)
            log.warning(
                "moved %d blobs (%d bytes) from Redis into the %s store; %d referenced blobs were in neither",
                report.copied,
                report.copied_bytes,
                target.kind,
                len(report.missing),
            )
        except CipherpoolError as exc:
            log.warning("could not move the blobs left in Redis into the store (%s): run `cipherpool store migrate`", exc)
        finally:
            source.redis.close()

    def _quiet(self) -> list[str]:
        return ["--without-gossip", "--without-mingle", "--loglevel", self.options.loglevel]

    def _start_control(self) -> None:
        """The control worker: the celery process that runs management tasks (not a pool node)."""
        self.supervisor.start(
            "control",
            CELERY
            + ["worker", "-Q", CONTROL_QUEUE, "-P", "threads", "-c", str(CONTROL_CONCURRENCY), "-n", f"control@{_host()}"]
            + self._quiet(),
            self.env,
        )

    def _start_nodes(self) -> None:
        """The pool nodes: celery processes on the pool queue, where models' workers are bound;
        from profiles if the options name them (the same line as `cipherpool pool node`)."""
        if self.options.profiles:
            known = load_profiles(self.settings.effective_profiles_file())
            for name, profile in zip(self.node_names, self.options.profiles):
                if profile not in known:
                    raise ConfigurationError(
                        f"No node profile {profile!r} in {self.settings.effective_profiles_file()}; "
                        f"known: {', '.join(sorted(known))}."
                    )
                env = {**self.env, **node_environment(known[profile], self.settings.effective_profiles_file())}
                argv = node_command(known[profile], name, loglevel=self.options.loglevel)
                self.supervisor.start(name.split("@")[0], argv, env)
            return
        for name in self.node_names:
            self.supervisor.start(
                name.split("@")[0],
                CELERY
                + ["worker", "-Q", POOL_QUEUE, "-P", "threads", "-c", str(self.options.node_concurrency), "-n", name]
                + self._quiet(),
                self.env,
            )

    def _start_beat_and_flower(self) -> None:
        if self.options.beat:
            schedule = str(self.data_dir / "celerybeat-schedule")
            self.supervisor.start("beat", CELERY + ["beat", "-s", schedule, "--loglevel", self.options.loglevel], self.env)
        if self.options.flower:
            self.flower_auth = flower_login(self.data_dir)
            self.supervisor.hide(self.flower_auth, self.flower_auth.partition(":")[2])
            # In the environment, not argv: a process list shows argv to every user.
            env = {**self.env, "FLOWER_BASIC_AUTH": self.flower_auth}

            def at(port: int) -> None:
                self.flower_url = f"http://127.0.0.1:{port}"

            def argv(port: int) -> list[str]:  # `cipherpool flower`: Flower's own, with the Models page
                return FLOWER + ["--address=127.0.0.1", f"--port={port}"]

            self._start_listener("flower", Listener("127.0.0.1", argv, at), self.settings.flower_port, env)

    def _start_gateway(self) -> None:
        host = self.settings.gateway_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host

        def at(port: int) -> None:
            self.gateway_url = f"http://{shown}:{port}"

        def argv(port: int) -> list[str]:
            return GATEWAY + ["--host", host, "--port", str(port), "--log-level", self.options.loglevel.lower()]

        self._start_listener("gateway", Listener(host, argv, at), self.settings.gateway_port, self.env)

    def _start_listener(self, name: str, listener: Listener, port: int | None, env: dict[str, str]) -> None:
        """Start a child serving on ``port``, or on a free one chosen here (which the child may
        lose before it binds it; see :meth:`_moved`)."""
        if not port:  # unset or 0: one chosen here
            listener.port = free_port()
            self._listeners[name] = listener
        self.supervisor.start(name, listener.argv(port or listener.port), env)
        listener.at(port or listener.port)

    def _moved(self, child: Child) -> bool:
        """Start ``child`` again on another port if it died at start because another process
        bound the port this stack chose for it, in the moment between :func:`free_port`
        letting it go and the child's own bind (a few times at most: the next port is free)."""
        listener = self._listeners.get(child.name)
        if listener is None or self._port_moves >= PORT_MOVES or not port_taken(listener.port, listener.host):
            return False
        self._port_moves += 1
        lost, listener.port = listener.port, free_port()
        log.warning("%s lost port %d to another process before binding it; now on %d", child.name, lost, listener.port)
        self.supervisor.restart(child, listener.argv(listener.port))
        listener.at(listener.port)
        return True

    def _wait_ready(self, database_url: str) -> None:
        """Ready when the gateway is ready (``/v1/ready``: its database, schema, broker and store
        answer), Flower answers its health check, the control worker answers a ping and every node
        has registered from the very process we started (matched by pid, so rows left by an
        earlier run of the same data directory do not count)."""
        from cipherpool.config.celery import create_app

        app = create_app(self.settings.model_copy(update={"broker_url": self.broker_url}), name="cipherpool-up")
        expected = {(c.name, c.pid) for c in self.supervisor.children if c.name.startswith("node")}

        def ready() -> bool:
            for child in self.supervisor.dead():
                if not self._moved(child):
                    raise PlatformError(self.supervisor.exited(child, "during start"))
            with session_scope(database_url) as session:
                rows = session.exec(select(PoolNode.name, PoolNode.pid).where(PoolNode.status == NodeStatus.ONLINE))
                online = {(name.split("@")[0], pid) for name, pid in rows}
            return (
                expected <= online
                and _answers(self.gateway_url + "/v1/ready")
                and (self.flower_url is None or _answers(self.flower_url + "/healthcheck"))
                and bool(app.control.ping(destination=[f"control@{_host()}"], timeout=0.5))
            )

        try:
            wait_until(
                ready,
                READY_TIMEOUT_S,
                error=PlatformError(
                    f"The stack was not ready within {READY_TIMEOUT_S:g}s; see logs in {self.supervisor.log_dir}"
                ),
            )
        finally:
            app.close()

    @property
    def stack_file(self) -> Path:
        return self.settings.model_copy(update={"data_dir": self.data_dir}).stack_file()

    def _write_stack_file(self) -> None:
        info = {"url": self.gateway_url, "docs": self.gateway_url + "/docs", "flower": self.flower_url, "pid": os.getpid()}
        if self.lock is not None:
            self.lock.record(url=self.gateway_url)
        write_private(self.stack_file, json.dumps(info, indent=2))

    def create_account(self, name: str) -> str:
        """A provider account in this stack's database; returns its API key (for demos and
        tests: an operator uses `cipherpool admin account create`)."""
        from cipherpool.services.accounts import create_account

        with session_scope(self.settings.effective_database_url()) as session:
            return create_account(session, name, signup_grant=self.settings.credits_signup_grant)[1]

    def describe(self) -> list[tuple[str, str]]:
        rows = [(c.name, f"pid {c.pid}") for c in self.supervisor.children]
        rows.append(("url", self.gateway_url))
        rows.append(("api docs", self.gateway_url + "/docs"))
        rows.append(("broker", mask_url(self.broker_url)))
        rows.append(("database", mask_url(self.env.get("CIPHERPOOL_DATABASE_URL", ""))))
        where = self.platform_settings
        rows.append(("blob store", f"fs {where.effective_blob_dir()}" if self.blob_store == "fs" else self.blob_store))
        if self.flower_url:
            rows.append(("flower", self.flower_url))
        rows.append(("logs", str(self.supervisor.log_dir)))
        return rows

    def pids(self) -> list[int]:
        return [c.pid for c in self.supervisor.children]

    def stop(self) -> None:
        """Stop every child; then, only if this stack held the data directory (a stack refused
        there leaves the running one's files alone), withdraw stack.json and the lock."""
        self.supervisor.stop_all()
        if self.lock is None:
            return
        try:
            self.stack_file.unlink(missing_ok=True)
        finally:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flower_login(data_dir: Path) -> str:
    """Flower's basic-auth login (user:password): generated at the data directory's first start
    with Flower, then read from its 0600 file, so the operator's saved login keeps working."""
    path = Path(data_dir) / FLOWER_LOGIN_FILE
    try:
        login = path.read_text().strip()
    except FileNotFoundError:
        login = ""
    if login.count(":") != 1 or not all(login.split(":")):
        login = f"{FLOWER_USER}:{secrets.token_urlsafe(16)}"
        write_private(path, login)
    os.chmod(path, 0o600)
    return login


def _answers(url: str) -> bool:
    """Whether ``url`` answers 200 (a child's readiness or health check)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _host() -> str:
    import socket

    return socket.gethostname()
