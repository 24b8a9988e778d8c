"""Faults under load: the measurements issue 21's closing note asks for.

Each scenario starts a platform of its own, every component a real process with a data
directory of its own (as on separate hosts, like tests/integration/test_start_order.py), keeps
a steady trickle of queries in flight through the gateway (the breast-cancer logistic
regression: fast FHE, so a fault, not the computation, decides the figures), injects one fault,
and counts what the client saw: queries accepted, answered correctly, lost (accepted and
never answered), failed (a typed error, with its code). A fault may cost time, never a query.

  node-kill          SIGKILL one of two nodes serving the model; the other takes its query
                     after the visibility timeout
  partition-redis    a node in a network namespace loses Redis (and the database) for 70 s
  partition-rabbitmq the same with RabbitMQ as the broker (results and blobs stay on Redis)
  gateway-restart    SIGTERM the gateway while clients long-poll, start it on the same port
  redis-restart      restart Redis (same port, password and append-only file)
  beat-outage        SIGKILL beat for 60 s, then start it again; what `status` says meanwhile
  startup            from a dependency becoming reachable to each component serving

Timeouts are shortened through the environment (visibility 10 s, heartbeats 2 s, reconcile
2 s), as an operator would for small models, so that each scenario takes a minute or two. A
node hook (HeldQuery, tests/integration/hosts.py) makes each query hold its node 0.5 s, as a
heavier model would: the cancer model alone takes 30 ms, and a fault would hardly ever meet a
query in progress.

Usage: sudo .venv/bin/python benchmarks/faults.py [--scenario NAME ...]   (default: all)
Needs root for the network namespaces (tests/netns.py); PostgreSQL on 127.0.0.1:5432 is used
when it answers (else SQLite), RabbitMQ on 127.0.0.1:5672 for partition-rabbitmq. Figures,
not assertions. Component logs stay in the directory printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.netns and tests.integration.hosts, when run as a script

# Shared with tests/integration/test_hosts_apart.py.
from tests.integration.hosts import (  # noqa: E402
    HOLD_ENV,
    RABBITMQ,
    listening,
    own_redis,
    rabbitmq_vhost,
    rabbitmqctl,
    start_redis,
)

# Read before the CIPHERPOOL_* environment is cleared (main()).
PG_ADMIN_URL = os.environ.get("CIPHERPOOL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
NET_PREFIX = "cpfault"  # namespaces and veth links of this script; leftovers are removed at start
SUBNET = "10.231.{}.0/30"  # private, between this script's own namespace and veth ends only
DB_PREFIX = "cipherpool_faults_"  # PostgreSQL databases and RabbitMQ vhosts of this script
MODEL = "cancer"
SAMPLES = 16  # distinct inputs, encrypted once, sent in turn
ATOL = 1e-3
MAX_POLLERS = 90  # threads waiting on results (the HTTP pool holds 100 connections)
QUERY_TIMEOUT_S = 240.0  # a client's wait for one query: above any outage below
VISIBILITY_TIMEOUT_S = 10  # Redis redelivers a dead node's query after this (FHE here: < 1 s)
HEARTBEAT_S = 2.0  # a node is lost after 3 silent heartbeats
RECONCILE_S = 2.0
PLATFORM_HEARTBEAT_S = 5.0  # gateways, control workers and beat: late after 1.5, missing after 3
QUERY_HOLD_S = 0.5  # each query holds its node this much longer (HeldQuery)
PARTITION_S = 70.0
BEAT_OUTAGE_S = 60.0
START_S = 120.0  # longest wait for any component to come up
LOST_CODES = {"query_timeout", "model_unavailable", "gateway_unavailable", "no answer"}
CELERY = [sys.executable, "-m", "celery", "-A", "cipherpool.tasks"]
QUIET = ["--without-gossip", "--without-mingle", "--loglevel", "INFO"]
T = TypeVar("T")


# --- results ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One scenario's row: what the client saw, whether the faulted node lived, and notes."""

    scenario: str
    submitted: int = 0  # accepted by the gateway (an id came back)
    correct: int = 0
    wrong: int = 0
    lost: Counter[str] = field(default_factory=Counter)  # accepted, never answered: why
    failed: Counter[str] = field(default_factory=Counter)  # "submit:<code>" refused, "result:<code>"
    node_alive: str = "-"
    notes: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)  # printed below the table
    skipped: str | None = None
    counted: bool = False  # a trickle ran (startup has none)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  [{self.scenario}] {text}", flush=True)


@dataclass
class Sent:
    """One accepted query and what became of it (times on time.monotonic())."""

    sample: int
    at: float
    handle: Any  # QueryHandle
    done_at: float | None = None
    output: bytes | None = None
    error: str | None = None  # the code of what result() raised
    node: str | None = None  # the node that computed it, read from its stored result (end users are not told)


def code_of(exc: BaseException) -> str:
    return str(getattr(exc, "code", "") or type(exc).__name__)


class Trickle:
    """A steady trickle of queries: one submit every ``interval_s`` from a thread of its own,
    each accepted query's ``result()`` waited on by a pool thread, so many are in flight at
    once, as from many end users. ``burst(n)`` adds n at once (a fault then surely meets
    queries taken but not finished). Ciphertexts are made beforehand: only bytes move here,
    and decryption happens once, at the end, in the caller's thread."""

    def __init__(
        self,
        qc: Any,
        ciphertexts: list[bytes],
        interval_s: float,
        timeout_s: float = QUERY_TIMEOUT_S,
        store_url: str | None = None,
    ):
        self.qc, self.ciphertexts, self.interval_s, self.timeout_s = qc, ciphertexts, interval_s, timeout_s
        self.store_url = store_url  # the platform's Redis: which node computed each answer
        self.sent: list[Sent] = []
        self.refused: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_POLLERS, thread_name_prefix="faults-poll")
        self._thread = threading.Thread(target=self._run, name="faults-trickle", daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.submit_one()
            self._stop.wait(self.interval_s)

    def submit_one(self) -> None:
        with self._lock:
            n, self._count = self._count, self._count + 1
        sample = n % len(self.ciphertexts)
        at = time.monotonic()
        try:
            handle = self.qc.submit(self.ciphertexts[sample])
        except Exception as exc:  # noqa: BLE001 - every refusal is counted by its code
            with self._lock:
                self.refused[code_of(exc)] += 1
            return
        sent = Sent(sample, at, handle)
        with self._lock:
            self.sent.append(sent)
        self._pool.submit(self._wait, sent)

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.submit_one()

    def _wait(self, sent: Sent) -> None:
        try:
            sent.output = sent.handle.result(self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - recorded, judged in tally()
            sent.error = code_of(exc)
        sent.done_at = time.monotonic()
        if sent.output is not None and self.store_url:
            sent.node = self._computed_by(sent.handle.id)

    def _computed_by(self, query_id: str) -> str | None:
        import redis

        from cipherpool.gateway.results import computed_by

        try:
            with redis.Redis.from_url(self.store_url or "", socket_timeout=5) as client:
                return computed_by(client, query_id)
        except redis.RedisError:
            return None

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)

    def in_flight(self) -> int:
        return sum(s.done_at is None for s in self.snapshot())

    def answered_by(self, node: str, since: float) -> int:
        return sum(1 for s in self.snapshot() if s.node == node and (s.done_at or 0) >= since)

    def finish(self, bound_s: float) -> list[Sent]:
        """Stop submitting and wait (at most ``bound_s``) for every accepted query's end."""
        self._stop.set()
        self._thread.join(timeout=60)
        deadline = time.monotonic() + bound_s
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.snapshot()

    def abort(self) -> None:
        """On an error: stop at once; closing the client ends every poll (no retry of a closed client)."""
        self._stop.set()
        self.qc.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def tally(out: Outcome, trickle: Trickle, expected: Any, bound_s: float = QUERY_TIMEOUT_S + 90) -> list[Sent]:
    """Wait for the trickle's queries and count them into ``out``; decrypt each answer and
    compare it with the model's clear answer."""
    import numpy as np

    sent = trickle.finish(bound_s)
    out.counted, out.submitted = True, len(sent)
    for s in sent:
        if s.output is not None:
            good = np.allclose(trickle.qc.decrypt(s.output), expected[s.sample : s.sample + 1], atol=ATOL)
            out.correct += int(good)
            out.wrong += int(not good)
        elif s.done_at is None or (s.error or "") in LOST_CODES:
            out.lost[s.error or "no answer"] += 1
        else:
            out.failed[f"result:{s.error}"] += 1
    for code, n in trickle.refused.items():
        out.failed[f"submit:{code}"] += n
    unanswered = [s.handle.id for s in sent if s.output is None]
    if unanswered:
        out.note(f"not answered (query ids, to find in the logs): {', '.join(unanswered[:5])}")
    latencies = sorted(s.done_at - s.at for s in sent if s.done_at is not None and s.output is not None)
    if latencies:
        out.note(f"latency median {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.1f} s")
    return sent


# --- infrastructure: database, Redis, RabbitMQ ------------------------------------------


def poll_until(predicate: Callable[[], T | None], timeout_s: float, interval_s: float = 0.2) -> T | None:
    """The first truthy value of ``predicate()`` within ``timeout_s``, else None (a figure,
    not a failure: the caller reports that it did not happen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - a component still coming up answers with errors
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


@dataclass
class Database:
    """The platform's database: a PostgreSQL database of this run's own where the machine has
    PostgreSQL (then a node in a namespace reaches it through a relay, and a partition cuts it
    too, as on another host), else an SQLite file (shared by every process: a partition then
    cuts only the broker, and the node's heartbeat goes on)."""

    url: str
    postgres: bool

    def via(self, host: str, port: int) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(host=host, port=port).render_as_string(hide_password=False)


def _pg_admin() -> Any:
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def postgres_available() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return listening(("127.0.0.1", 5432))


@contextlib.contextmanager
def database(root: Path) -> Iterator[Database]:
    if not postgres_available():
        yield Database(f"sqlite:///{root / 'db' / 'cipherpool.db'}", postgres=False)
        return
    from sqlalchemy import text

    from cipherpool.db import get_engine

    name = f"{DB_PREFIX}{uuid.uuid4().hex[:8]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield Database(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, postgres=True)
    finally:
        get_engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def remove_leftovers() -> None:
    """What a killed earlier run of this script left: its namespaces, veth links, databases
    and vhosts (all named with this script's prefixes, so nothing else is touched)."""
    from tests import netns

    if netns.unavailable() is None:
        removed = netns.cleanup(NET_PREFIX)
        if removed:
            print(f"removed leftover namespaces/links: {', '.join(removed)}")
    if postgres_available():
        from sqlalchemy import text

        admin = _pg_admin()
        with admin.connect() as conn:
            names = [
                r[0] for r in conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": DB_PREFIX + "%"})
            ]
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                print(f"removed leftover database {name}")
        admin.dispose()
    if shutil.which("rabbitmqctl") and listening(RABBITMQ):
        try:
            vhosts = rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").stdout.split()
        except subprocess.SubprocessError:
            vhosts = []
        for name in vhosts:
            if name.startswith(DB_PREFIX):
                rabbitmqctl("delete_vhost", name)
                print(f"removed leftover vhost {name}")


# --- the platform ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    """Where one host finds the platform's services."""

    broker: str
    store: str  # result backend and blob store: Redis
    database: str


class Platform:
    """One scenario's platform: gateway, control worker, beat and pool nodes, each started by
    the Supervisor with a data directory of its own and its own view of the network."""

    def __init__(self, root: Path, supervisor: Any, links: Links):
        from cipherpool.stack.supervisor import free_port

        self.root, self.supervisor, self.links = root, supervisor, links
        self.gateway_port = free_port()
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.metrics_token = uuid.uuid4().hex
        self.children: dict[str, Any] = {}

    def env(self, host: str, links: Links | None = None) -> dict[str, str]:
        links = links or self.links
        data = self.root / host
        (data / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(data),
            "TMPDIR": str(data / "tmp"),
            "PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}",
            "CIPHERPOOL_DATA_DIR": str(data),
            "CIPHERPOOL_BROKER_URL": links.broker,
            "CIPHERPOOL_RESULT_BACKEND": links.store,
            "CIPHERPOOL_STORE_URL": links.store,
            "CIPHERPOOL_DATABASE_URL": links.database,
            "CIPHERPOOL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "CIPHERPOOL_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
            "CIPHERPOOL_RECONCILE_INTERVAL_S": str(RECONCILE_S),
            "CIPHERPOOL_PLATFORM_HEARTBEAT_S": str(PLATFORM_HEARTBEAT_S),
            "CIPHERPOOL_PLATFORM_WATCHDOG_S": str(PLATFORM_HEARTBEAT_S),
            "CIPHERPOOL_QUERY_TIMEOUT_S": str(QUERY_TIMEOUT_S),
            "CIPHERPOOL_METRICS_TOKEN": self.metrics_token,
            "CIPHERPOOL_NODE_THREADS": "1",
            "CIPHERPOOL_NODE_HOOKS": "tests.integration.hosts:HeldQuery",
            HOLD_ENV: str(QUERY_HOLD_S),
        }

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Any:
        child = self.supervisor.start(name, argv, env)
        self.children[name] = child
        return child

    def start_gateway(self) -> Any:
        return self._start(
            "gateway",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "cipherpool.gateway.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.gateway_port),
                "--log-level",
                "info",
            ],
            self.env("gateway"),
        )

    def start_control(self) -> Any:
        return self._start(
            "control",
            CELERY + ["worker", "-Q", "cipherpool.control", "-P", "threads", "-c", "2", "-n", "control@faults", *QUIET],
            self.env("control"),
        )

    def start_beat(self) -> Any:
        (self.root / "beat").mkdir(exist_ok=True)
        return self._start(
            "beat", CELERY + ["beat", "-s", str(self.root / "beat" / "schedule"), "--loglevel", "INFO"], self.env("beat")
        )

    def start_node(self, name: str, namespace: Any = None, links: Links | None = None) -> Any:
        argv = CELERY + ["worker", "-Q", "cipherpool.pool", "-P", "threads", "-c", "1", "-n", f"{name}@faults", *QUIET]
        return self._start(name, namespace.command(argv) if namespace else argv, self.env(name, links))

    # What "up" means for each.
    def http(self, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.gateway + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def ready(self) -> bool:
        return self.http("/v1/ready")[0] == 200

    def node_row(self, name: str) -> Any:
        from cipherpool.db import session_scope
        from cipherpool.db.tables import PoolNode

        with session_scope(self.links.database) as s:
            row = s.get(PoolNode, f"{name}@faults")
            if row is not None:
                s.expunge(row)
            return row

    def registered(self, name: str) -> bool:
        """Online in the database, registered by the very process we started (its pid)."""
        from cipherpool.db.tables import NodeStatus

        row = self.node_row(name)
        return row is not None and row.status == NodeStatus.ONLINE and row.pid == self.children[name].pid

    def ping(self, name: str) -> bool:
        from cipherpool.config.celery import create_app
        from cipherpool.config.settings import Settings

        app = create_app(Settings(broker_url=self.links.broker, result_backend=self.links.store), name="faults-ping")
        try:
            return bool(app.control.ping(destination=[f"{name}@faults"], timeout=1.0))
        finally:
            app.close()

    def beat_status(self) -> tuple[str, str]:
        """What GET /v1/platform/status (the view `cipherpool status` prints) says of beat."""
        code, body = self.http("/v1/platform/status?events=0", self.metrics_token)
        if code != 200:
            return f"HTTP {code}", str(body.get("code", ""))
        beat = next((c for c in body.get("components", []) if c.get("component") == "beat"), {})
        return str(beat.get("state")), str(beat.get("detail"))

    def wait_up(self, nodes: list[str]) -> None:
        for child in self.children.values():
            if not child.alive():
                raise RuntimeError(f"{child.name} exited at start; see {child.log_path}")
        if not poll_until(self.ready, START_S, 0.5):
            raise RuntimeError(f"the gateway was not ready within {START_S:g} s; see {self.supervisor.log_dir}")
        for name in nodes:
            if not poll_until(lambda n=name: self.registered(n), START_S, 0.5):
                raise RuntimeError(f"{name} did not register within {START_S:g} s; see {self.children[name].log_path}")

    # The provider and the end user, through the gateway only.
    def provider(self, example: Any) -> tuple[Any, str]:
        from cipherpool.client import ManagementClient
        from cipherpool.db import session_scope
        from cipherpool.services.accounts import create_account

        with session_scope(self.links.database) as s:
            api_key = create_account(s, "provider", signup_grant=10**9)[1]
        mc = ManagementClient(api_key, settings=self.client_settings())
        mc.deploy_model(MODEL, example.path, max_workers=2)
        mc.activate_model(MODEL)
        return mc, mc.create_token("user", model=MODEL)

    def client_settings(self) -> Any:
        from cipherpool.config.settings import Settings

        return Settings(url=self.gateway, data_dir=self.root / "client", query_timeout_s=QUERY_TIMEOUT_S)

    def end_user(self, token: str, example: Any) -> tuple[Any, list[bytes], Any]:
        """A client with its keys uploaded, the ciphertexts it sends and their clear answers."""
        from cipherpool.client import QueryClient

        qc = QueryClient(token, settings=self.client_settings(), key_dir=self.root / "keys")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        xs = example.x_test[:SAMPLES]
        return qc, [qc.encrypt(x) for x in xs], example.clear(xs)


def kill(child: Any, sig: int = signal.SIGKILL, grace_s: float = 60.0) -> float:
    """Signal one child by its pid and reap it; seconds until it exited (SIGKILL after grace_s)."""
    start = time.monotonic()
    os.kill(child.pid, sig)
    try:
        child.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        child.process.wait(timeout=10)
    return time.monotonic() - start


def restart(supervisor: Any, child: Any) -> None:
    """Start a dead child again with its command (same port, same data): the supervisor's own
    restart, when it is the only dead child."""
    dead = supervisor.dead()
    if dead != [child]:
        raise RuntimeError(f"expected only {child.name} dead, found {[c.name for c in dead]}")
    supervisor.restart_dead()


def forget(supervisor: Any, child: Any) -> None:
    """A child killed for good: drop it, so that the final stop never signals its reused pid."""
    supervisor.children.remove(child)


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Run:
    """What a scenario gets: a directory, the supervisor, the trained example, its row, and
    two stacks of clean-ups: ``before_stop`` (clients) and ``resources`` (namespaces, relays,
    vhost, database), around the supervisor's stop of every process."""

    name: str
    root: Path
    supervisor: Any
    example: Any
    out: Outcome
    resources: contextlib.ExitStack
    before_stop: contextlib.ExitStack
    index: int  # distinct subnets per scenario


def simple_platform(run: Run, nodes: tuple[str, ...], workers: int) -> tuple[Platform, Any, Any, list[bytes], Any, Any]:
    """Redis, database, control, beat, gateway and ``nodes`` on loopback, the model served by
    ``workers`` workers, a ready client; returns (platform, redis, mc, ciphertexts, expected, qc)."""
    from cipherpool.db import init_db

    db = run.resources.enter_context(database(run.root))
    init_db(db.url)
    redis = start_redis(run.supervisor, run.root)
    p = Platform(run.root, run.supervisor, Links(redis.url(), redis.url(), db.url))
    p.start_control()
    p.start_beat()
    p.start_gateway()
    for name in nodes:
        p.start_node(name)
    p.wait_up(list(nodes))
    mc, token = p.provider(run.example)
    run.before_stop.callback(mc.close)
    mc.start_workers(MODEL, workers)
    qc, ciphertexts, expected = p.end_user(token, run.example)
    run.before_stop.callback(qc.close)
    return p, redis, mc, ciphertexts, expected, qc


def trickle_for(run: Run, p: Platform, qc: Any, ciphertexts: list[bytes], interval_s: float) -> Trickle:
    trickle = Trickle(qc, ciphertexts, interval_s, store_url=p.links.store)
    run.before_stop.callback(trickle.abort)
    return trickle.start()


def node_kill(run: Run) -> None:
    """Two nodes serve the model; one is SIGKILLed right after a burst, so it holds a query it
    took (unacknowledged: acks are late). Redis hands that query to the other node once the
    visibility timeout passes; the client only waits longer."""
    out = run.out
    p, _, mc, ciphertexts, expected, qc = simple_platform(run, ("node1", "node2"), workers=2)
    trickle = trickle_for(run, p, qc, ciphertexts, 0.7)
    time.sleep(8)
    victim = p.children["node2"]
    victim_worker = next(w for w in mc.list_workers(MODEL) if w.node == "node2@faults")
    trickle.burst(6)
    time.sleep(0.3)
    kill(victim)
    forget(run.supervisor, victim)
    killed = time.monotonic()
    out.node_alive = "killed (the fault)"
    failed = poll_until(lambda: mc.get_worker(victim_worker.id).status.value == "failed", 40, 0.5)
    out.note(
        f"killed node's worker failed by the reconciler after {time.monotonic() - killed:.1f} s"
        if failed
        else "killed node's worker not failed within 40 s"
    )
    time.sleep(max(0.0, VISIBILITY_TIMEOUT_S + 15 - (time.monotonic() - killed)))
    sent = tally(out, trickle, expected)
    late = [s for s in sent if s.output is not None and s.at <= killed and s.done_at - killed >= VISIBILITY_TIMEOUT_S - 1]
    after = Counter(s.node for s in sent if s.output is not None and (s.done_at or 0) > killed)
    out.note(
        f"{len(late)} answered only after the visibility timeout (redelivered), "
        f"{max((s.done_at - s.at for s in late), default=0):.1f} s the longest; "
        f"answers after the kill by node: {dict(after)}"
    )


def partition(run: Run, broker: str) -> None:
    """A node "on another host" (a network namespace) serves the model while a second one is
    free; the link to it goes down for 70 s, then up again. Its broker connection, its result
    store and its database all go through the veth pair, so the node is cut off from
    everything, as by a failed switch; the rest of the platform (on loopback) goes on."""
    from cipherpool.db import init_db
    from tests.netns import Namespace, TcpRelay, unavailable

    out = run.out
    reason = unavailable()
    if reason:
        out.skipped = reason
        return
    if broker == "rabbitmq" and not (shutil.which("rabbitmqctl") and listening(RABBITMQ)):
        out.skipped = "no RabbitMQ on 127.0.0.1:5672 (or no rabbitmqctl)"
        return
    ns = run.resources.enter_context(Namespace(f"{NET_PREFIX}{run.index}", SUBNET.format(run.index)))
    db = run.resources.enter_context(database(run.root))
    init_db(db.url)
    redis = start_redis(run.supervisor, run.root, bind=(ns.host_address,))
    apart_db = db.url
    if db.postgres:
        db_relay = run.resources.enter_context(TcpRelay((ns.host_address, 0), ("127.0.0.1", 5432)))
        apart_db = db.via(*db_relay.address)
    else:
        out.note("SQLite: the node's heartbeat reaches the shared file through the partition")
    if broker == "rabbitmq":
        vhost = run.resources.enter_context(rabbitmq_vhost(DB_PREFIX))
        mq_relay = run.resources.enter_context(TcpRelay((ns.host_address, 0), RABBITMQ))
        near_broker = f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{vhost}"
        apart_broker = f"amqp://guest:guest@{mq_relay.address[0]}:{mq_relay.address[1]}/{vhost}"
    else:
        near_broker, apart_broker = redis.url(), redis.url(ns.host_address)
    p = Platform(run.root, run.supervisor, Links(near_broker, redis.url(), db.url))
    apart_links = Links(apart_broker, redis.url(ns.host_address), apart_db)
    p.start_control()
    p.start_beat()
    p.start_gateway()
    apart = p.start_node("apart", ns, apart_links)
    p.wait_up(["apart"])
    mc, token = p.provider(run.example)
    run.before_stop.callback(mc.close)
    worker = mc.start_worker(MODEL)  # the only node yet: it lands on "apart"
    p.start_node("near")
    qc, ciphertexts, expected = p.end_user(token, run.example)
    run.before_stop.callback(qc.close)
    p.wait_up(["near"])
    if worker.node != "apart@faults":
        out.note(f"the worker landed on {worker.node}, not on the partitioned node")
    pid = apart.pid
    trickle = trickle_for(run, p, qc, ciphertexts, 1.0)
    time.sleep(8)

    ns.partition()
    cut = time.monotonic()
    failed_at = replaced_at = None
    while time.monotonic() - cut < PARTITION_S:
        if failed_at is None and mc.get_worker(worker.id).status.value == "failed":
            failed_at = time.monotonic() - cut
        if replaced_at is None and any(w.status.value == "up" and w.id != worker.id for w in mc.list_workers(MODEL)):
            replaced_at = time.monotonic() - cut
        time.sleep(1)
    seen = p.node_row("apart").last_seen
    ns.heal()
    healed = time.monotonic()
    out.note(
        f"worker failed {failed_at:.0f} s into the partition"
        if failed_at is not None
        else "worker NOT failed during the partition"
    )
    out.note(
        f"replacement up {replaced_at:.0f} s into the partition"
        if replaced_at is not None
        else "no replacement during the partition"
    )

    beat_again = poll_until(lambda: p.node_row("apart").last_seen > seen, 120, 0.5)
    out.note(
        f"node heartbeat in the database again {time.monotonic() - healed:.1f} s after healing"
        if beat_again
        else "node heartbeat NOT back within 120 s of healing"
    )
    pinged = poll_until(lambda: p.ping("apart"), 120, 1.0)
    out.note(
        f"node answers a broker ping {time.monotonic() - healed:.1f} s after healing"
        if pinged
        else "node does NOT answer a broker ping within 120 s of healing"
    )
    status = mc.get_worker(worker.id).status.value
    if status == "failed":  # a second worker, to see the node serve again: the other node is busy
        try:
            second = mc.start_worker(MODEL, timeout=120)
            out.note(f"a new worker started on {second.node} {time.monotonic() - healed:.1f} s after healing")
        except Exception as exc:  # noqa: BLE001 - reported: the node cannot take work again
            out.note(f"a new worker did not start after healing: {code_of(exc)}: {exc}")
    serving = time.monotonic()
    served = poll_until(lambda: trickle.answered_by("apart@faults", healed), 120, 0.5)
    out.note(
        f"node answered queries again {time.monotonic() - healed:.1f} s after healing"
        if served
        else "node answered NO query within the bound after healing"
    )
    time.sleep(max(0.0, 30 - (time.monotonic() - serving)))
    shares = Counter(s.node for s in trickle.snapshot() if s.output is not None and (s.done_at or 0) >= serving)
    out.note(f"answers by node in the {time.monotonic() - serving:.0f} s after it could serve again: {dict(shares)}")
    if apart.alive():
        out.node_alive = f"yes (pid {pid} {'same' if apart.pid == pid else 'CHANGED'})"
    else:
        out.node_alive = f"NO: pid {pid} exited with {apart.process.returncode}"
    out.note(f"its first worker ended {status}" + (" and was replaced" if replaced_at is not None else ""))
    out.note(f"queries beat sent again (lost between the broker and a node): {redelivered(run.supervisor.log_dir)}")
    tally(out, trickle, expected)


def redelivered(log_dir: Path) -> int:
    """How many times beat's redelivery sent a lost query again (cipherpool.scheduler.redeliver
    logs each), read from the component logs."""
    return sum(path.read_text(errors="replace").count("sent again to ") for path in Path(log_dir).glob("*.log"))


def gateway_restart(run: Run) -> None:
    """The gateway is stopped (SIGTERM) while clients long-poll queries that are queued (the
    worker is on standby, so they stay open), and started again on the same port. Polls are
    GETs: the client retries them; submits whose connection was refused are retried too."""
    out = run.out
    p, _, mc, ciphertexts, expected, qc = simple_platform(run, ("node1",), workers=1)
    [worker] = mc.list_workers(MODEL)
    qc.wait_for_worker = True  # queued while the worker is on standby, not refused with no_worker_up
    trickle = trickle_for(run, p, qc, ciphertexts, 1.0)
    time.sleep(6)
    mc.standby_worker(worker.id)
    time.sleep(5)
    open_polls = trickle.in_flight()
    gateway = p.children["gateway"]
    stop_s = kill(gateway, signal.SIGTERM)
    down = time.monotonic()
    restart(run.supervisor, gateway)
    back = poll_until(lambda: p.http("/v1/health")[0] == 200, START_S, 0.1)
    out.note(
        f"{open_polls} long polls open at SIGTERM; the gateway took {stop_s:.1f} s to exit, "
        f"answered again {time.monotonic() - down:.1f} s after exiting"
        if back
        else "gateway NOT back"
    )
    mc.resume_worker(worker.id)
    time.sleep(20)
    tally(out, trickle, expected)


def redis_restart(run: Run) -> None:
    """Redis stops (SIGTERM: it writes its append-only file) with queries queued and taken,
    stays down 5 s and comes back on the same port with the same data: queued queries,
    unacknowledged ones and results were on disk. Submits meanwhile get broker_unavailable
    (a POST is never resent by the client: counted as failed, by design)."""
    out = run.out
    p, redis, _, ciphertexts, expected, qc = simple_platform(run, ("node1", "node2"), workers=2)
    trickle = trickle_for(run, p, qc, ciphertexts, 0.5)
    time.sleep(8)
    trickle.burst(6)
    stop_s = kill(redis.child, signal.SIGTERM, grace_s=30)
    stopped = time.monotonic()
    time.sleep(5)
    restart(run.supervisor, redis.child)
    up = poll_until(redis.answers, 30, 0.1)
    back = time.monotonic()
    out.note(f"Redis took {stop_s:.1f} s to stop, answered {back - stopped:.1f} s after" if up else "Redis NOT back")
    first = poll_until(lambda: next((s for s in trickle.snapshot() if s.at > back and s.output is not None), None), 60, 0.2)
    out.note(
        f"first query submitted after the restart answered {first.done_at - back:.1f} s after it"
        if first
        else "no query submitted after the restart was answered within 60 s"
    )
    alive = [n for n in ("node1", "node2") if p.children[n].alive()]
    out.node_alive = f"{len(alive)} of 2 nodes (pids same)"
    time.sleep(20)
    tally(out, trickle, expected)


def beat_outage(run: Run) -> None:
    """Beat is SIGKILLed for 60 s: queries do not need it; only the periodic jobs (reconcile,
    billing, ...) stop. The operator's view (GET /v1/platform/status, what `cipherpool status`
    prints) is read every 5 s meanwhile."""
    out = run.out
    p, _, _, ciphertexts, expected, qc = simple_platform(run, ("node1",), workers=1)
    trickle = trickle_for(run, p, qc, ciphertexts, 1.0)
    time.sleep(6)
    state, detail = p.beat_status()
    out.timeline.append(f"before: {state}: {detail}")
    beat = p.children["beat"]
    kill(beat)
    killed = time.monotonic()
    last = None
    while time.monotonic() - killed < BEAT_OUTAGE_S:
        time.sleep(5)
        state, detail = p.beat_status()
        if (state, detail.split(",")[0]) != last:  # one line per change (the ages tick on)
            out.timeline.append(f"+{time.monotonic() - killed:4.0f} s: {state}: {detail}")
            last = (state, detail.split(",")[0])
    if out.timeline[-1].split(": ", 1)[1] != f"{state}: {detail}":  # the last reading, whatever it says
        out.timeline.append(f"+{time.monotonic() - killed:4.0f} s: {state}: {detail}")
    answered = sum(1 for s in trickle.snapshot() if s.output is not None and s.done_at and s.done_at > killed)
    out.note(f"{answered} queries answered during the outage")
    restart(run.supervisor, beat)
    started = time.monotonic()
    ok = poll_until(lambda: p.beat_status()[0] == "ok", 90, 1.0)
    state, detail = p.beat_status()
    out.timeline.append(f"after restart (+{time.monotonic() - started:.0f} s): {state}: {detail}")
    out.note(
        f"status says beat ok {time.monotonic() - started:.1f} s after its restart"
        if ok
        else "status did NOT say beat ok within 90 s of its restart"
    )
    tally(out, trickle, expected)


def race(checks: dict[str, Callable[[], Any]], since: float, timeout_s: float = START_S) -> dict[str, float | None]:
    """Poll every check together; seconds from ``since`` until each first held (None: not
    within ``timeout_s``). Together, so that a slow one does not delay another's figure."""
    figures: dict[str, float | None] = dict.fromkeys(checks)
    pending = dict(checks)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for name, predicate in list(pending.items()):
            try:
                done = predicate()
            except Exception:  # noqa: BLE001 - still coming up
                done = False
            if done:
                figures[name] = time.monotonic() - since
                del pending[name]
        time.sleep(0.1)
    return figures


def startup(run: Run) -> None:
    """Every component started before its dependencies (test_start_order.py's approach); then
    Redis comes up, then the database becomes reachable (PostgreSQL: a relay on loopback opens;
    SQLite: the schema is migrated). Seconds from each to each component serving."""
    import redis as redis_client

    from cipherpool.db import init_db
    from cipherpool.names import BEAT_JOBS_KEY, PROCESS_BEAT_PREFIX, RECONCILE_TASK
    from cipherpool.stack.supervisor import free_port
    from tests.netns import TcpRelay

    out = run.out
    db = run.resources.enter_context(database(run.root))
    relay_port = free_port()
    if db.postgres:
        init_db(db.url)
        platform_db = db.via("127.0.0.1", relay_port)  # nothing listens there yet: unreachable
    else:
        platform_db = db.url
    redis = own_redis(run.root)
    p = Platform(run.root, run.supervisor, Links(redis.url(), redis.url(), platform_db))
    p.start_gateway()
    p.start_control()
    p.start_beat()
    p.start_node("node1")
    if not poll_until(lambda: p.http("/v1/health")[0] == 200, START_S, 0.2):
        raise RuntimeError("the gateway did not start without its dependencies")
    time.sleep(5)
    dead = [c.name for c in run.supervisor.dead()]
    out.note(f"all four started without Redis or the database; dead meanwhile: {dead or 'none'}")

    store = redis_client.Redis.from_url(redis.url(), socket_connect_timeout=1, socket_timeout=2)
    run.before_stop.callback(store.close)
    redis.start(run.supervisor)
    up = time.monotonic()
    figures = race(
        {
            "control answers a ping, after Redis": lambda: p.ping("control"),
            "node answers a ping, after Redis": lambda: p.ping("node1"),
            "beat heartbeat in Redis, after Redis": lambda: store.hlen(PROCESS_BEAT_PREFIX + "beat"),
        },
        up,
    )
    time.sleep(max(0.0, 15 - (time.monotonic() - up)))

    if db.postgres:
        run.resources.enter_context(TcpRelay(("127.0.0.1", relay_port), ("127.0.0.1", 5432)))
        what = "database reachable"
    else:
        init_db(db.url)
        what = "schema migrated"
    reachable, wall = time.monotonic(), time.time()
    figures.update(
        race(
            {
                f"node registered, after {what}": lambda: p.registered("node1"),
                f"gateway ready, after {what}": p.ready,
                f"beat's reconcile ran (beat+control), after {what}": lambda: (
                    float(store.hget(BEAT_JOBS_KEY, RECONCILE_TASK) or 0) > wall
                ),
            },
            reachable,
        )
    )
    for name, value in figures.items():
        out.timeline.append(f"{name:64s} " + (f"not within {START_S:g} s" if value is None else f"{value:5.1f} s"))
    out.note(f"Redis up, then the {what} {reachable - up:.0f} s later ({'PostgreSQL' if db.postgres else 'SQLite'})")


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "node-kill": node_kill,
    "partition-redis": lambda run: partition(run, "redis"),
    "partition-rabbitmq": lambda run: partition(run, "rabbitmq"),
    "gateway-restart": gateway_restart,
    "redis-restart": redis_restart,
    "beat-outage": beat_outage,
    "startup": startup,
}


def run_scenario(name: str, index: int, example: Any, base: Path) -> Outcome:
    """One scenario, cleaned up whatever happens: clients, then every process by its pid,
    then namespaces, relays, the vhost and the database. The logs stay under ``base``."""
    from cipherpool.stack.supervisor import Supervisor

    out = Outcome(name)
    root = base / name
    root.mkdir(parents=True)
    print(f"== {name}", flush=True)
    started = time.monotonic()
    with contextlib.ExitStack() as resources:
        supervisor = Supervisor(root / "logs")
        try:
            with contextlib.ExitStack() as before_stop:
                try:
                    SCENARIOS[name](Run(name, root, supervisor, example, out, resources, before_stop, index))
                except Exception as exc:  # noqa: BLE001 - one scenario's failure is a figure, the rest run
                    traceback.print_exc()
                    out.note(f"ERROR {type(exc).__name__}: {exc}")
        finally:
            supervisor.stop_all(grace_s=20)
    for entry in root.iterdir():  # data (Redis's file, keys, models): not needed once it is over
        if entry.name != "logs":
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
    out.note(f"scenario took {time.monotonic() - started:.0f} s")
    return out


def print_table(outcomes: list[Outcome]) -> None:
    header = ("scenario", "submitted", "correct", "lost", "failed (codes)", "node alive after")
    rows = []
    for o in outcomes:
        if o.skipped:
            rows.append((o.scenario, "-", "-", "-", "-", f"skipped: {o.skipped}"))
            continue
        if not o.counted:
            rows.append((o.scenario, "-", "-", "-", "-", o.node_alive))
            continue
        failed = ", ".join(f"{c}x{n}" for c, n in sorted(o.failed.items())) or "0"
        lost = str(sum(o.lost.values())) + (f" ({', '.join(f'{c}x{n}' for c, n in o.lost.items())})" if o.lost else "")
        correct = f"{o.correct}" + (f" (+{o.wrong} WRONG)" if o.wrong else "")
        rows.append((o.scenario, str(o.submitted), correct, lost, failed, o.node_alive))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for o in outcomes:
        if o.notes or o.timeline:
            print(f"\n{o.scenario}:")
            for line in o.notes:
                print(f"  - {line}")
            for line in o.timeline:
                print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="run only this one (repeatable); default: all"
    )
    args = parser.parse_args()
    names = args.scenario or list(SCENARIOS)

    # A stray CIPHERPOOL_* of the shell must not reach this process's own clients.
    for key in [k for k in os.environ if k.startswith("CIPHERPOOL_")]:
        del os.environ[key]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill of the script still cleans up
    base = Path(tempfile.mkdtemp(prefix="cipherpool-faults-"))
    os.environ["TMPDIR"] = str(base / "tmp")  # concrete's files of this process
    (base / "tmp").mkdir()
    remove_leftovers()

    from cipherpool.examples import train_breast_cancer

    example = train_breast_cancer(base / "model")
    outcomes = [run_scenario(name, i + 1, example, base) for i, name in enumerate(names)]
    shutil.rmtree(base / "model", ignore_errors=True)
    shutil.rmtree(base / "tmp", ignore_errors=True)
    print()
    print_table(outcomes)
    print(f"\ncomponent logs: {base}/<scenario>/logs")


if __name__ == "__main__":
    main()
