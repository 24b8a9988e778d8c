"""Hosts apart, in the suite (issue 24): the platform run as separate hosts on one machine.

Each platform process runs in a network namespace of its own (tests/netns.py: a veth pair with
addresses in a private 10.x range picked by the test, used only between its own namespaces and
the machine), with a data directory of its own and no shared filesystem: the gateway, the
control worker, beat, a cpu node and two nodes of host class ``gpu`` (declared so in their
profile, without a GPU: the class is a routing matter, docs/architecture.md). Every process
reaches the broker, the database and the blob store only at its namespace's host-side address,
never over loopback: a Redis of the test's own (password, listening on those addresses) is the
store and result backend (and the broker in the Redis variant); the machine's PostgreSQL (a
database of the run's own) and RabbitMQ (a vhost of the run's own) listen on loopback only and
are reached through a TCP relay per namespace. The processes are started with `cipherpool up`'s
own command lines.

Then, through the gateway at its namespace's address, as a provider and an end user would: two
models bound to a host class each, served only on their class; a gpu node SIGKILLed with
queries in flight (all answered, the one it had just taken redelivered; its worker replaced on
the other gpu node; the host restarted, it stays free); the node serving the replacement
partitioned (its veth link down: broker, store and database all cut) for longer than three
heartbeats with a query in its hands and more sent as the link goes down, the first of which is
handed to the node's idle second slot (on Redis the node may never receive it: beat sends it
again), then healed (all answered; the node alive with the same pid, its worker replaced
elsewhere, the node free afterwards and able to serve again). Every answer is decrypted and
compared with the clear model. Both brokers.

Timeouts are short, through the environment as an operator would set them for small models:
heartbeats 2 s (a node is lost after 6 s), reconcile 1 s, visibility 10 s, redelivery grace 3 s.
A node hook (tests/integration/hosts.py: HeldQuery) holds each query 0.5 s on its node so that a
fault meets queries in progress; which queries a node has just taken is asked of the node itself
(a broker inspect), so each fault strikes while one is in its hands. Skips, with the reason,
where namespaces cannot be made (not root, no iproute2), without PostgreSQL (SQLite would need a
shared filesystem) and, for its variant, without RabbitMQ or rabbitmqctl.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.statuses import WorkerStatus
from cipherpool.waiting import WaitTimeout, wait_until
from tests import netns
from tests.conftest import _postgres_database, _postgres_reachable
from tests.integration.hosts import (
    HOLD_ENV,
    RABBITMQ,
    OwnRedis,
    own_redis,
    rabbitmq_unavailable,
    rabbitmq_vhost,
    remove_stale_vhosts,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]  # PostgreSQL: no filesystem is shared

REPO = Path(__file__).resolve().parents[2]
NET = "cphst"  # namespaces and veth links of this test: NET + a tag per session + the host's short name
VHOST_PREFIX = "cipherpool_hosts_apart_"
SITE = "hosts-apart"  # the host part of Celery node names
HEARTBEAT_S = 2.0  # a node is lost after 3 silent heartbeats: 6 s
RECONCILE_S = 1.0
VISIBILITY_S = 10  # Redis hands an unacknowledged query to another node after this
REDELIVERY_GRACE_S = 3  # Redis: beat sends again a query missing (in no queue, in no node's hands) twice this far apart
HOLD_S = 0.5  # HeldQuery: each query holds its node this long
BURST = 6  # gpu queries in flight when a fault strikes (3 s of work for one node)
SAMPLES = 12
ATOL = 1e-3
QUERY_TIMEOUT_S = 120.0
START_S = 120.0
FAULT_S = 45.0  # bound on each wait for the platform to notice a fault and act
GPU_NODES = ("gpu1", "gpu2")
HOSTS = {"gateway": "gw", "control": "ctl", "beat": "bt", "cpu1": "c1", "gpu1": "g1", "gpu2": "g2"}
PROFILES = """
[profiles.cpu-small]
host_class = "cpu"
concurrency = 1
threads = 1

[profiles.gpu-small]
host_class = "gpu"
concurrency = 2
threads = 1
"""
NODE_PROFILE = {"cpu1": "cpu-small", "gpu1": "gpu-small", "gpu2": "gpu-small"}


def node(host: str) -> str:
    return f"{host}@{SITE}"


# --- fixtures: the trained model, the namespaces --------------------------------------------


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer

    return train_breast_cancer(tmp_path_factory.mktemp("hosts-apart-model") / "cancer")


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, netns.Namespace]]:
    """One namespace per host, for both brokers' runs (their processes are stopped between)."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"hosts apart need network namespaces: {reason}")
    if not _postgres_reachable():
        pytest.skip("hosts apart need PostgreSQL on 127.0.0.1:5432 (SQLite would need a filesystem shared by the hosts)")
    netns.cleanup_idle(NET)  # what a killed earlier run left (a live run's namespaces hold processes)
    tag = uuid.uuid4().hex[:3]
    subnets = netns.free_subnets(len(HOSTS))
    with contextlib.ExitStack() as stack:
        made = {
            host: stack.enter_context(netns.Namespace(f"{NET}{tag}{short}", subnet))
            for (host, short), subnet in zip(HOSTS.items(), subnets)
        }
        yield made


# --- the platform, hosts apart --------------------------------------------------------------


@dataclass
class Platform:
    """One run's platform: the services on the machine, each platform process in its host's
    namespace. ``links`` says, per host, where it finds the broker, store and database."""

    root: Path
    broker: str  # redis | rabbitmq
    hosts: dict[str, netns.Namespace]
    redis: OwnRedis
    database: str  # the operator's URL (loopback): the test is the operator on the services' side
    operator_broker: str
    links: dict[str, dict[str, str]]
    supervisor: Any
    gateway_port: int
    children: dict[str, Any] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"http://{self.hosts['gateway'].address}:{self.gateway_port}"

    def env(self, host: str) -> dict[str, str]:
        data = self.root / host
        (data / "tmp").mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(data),
            "TMPDIR": str(data / "tmp"),
            "PYTHONPATH": str(REPO),
            "CIPHERPOOL_DATA_DIR": str(data),
            **self.links[host],
            "CIPHERPOOL_BLOB_STORE": "redis",  # no filesystem is shared: blobs live in the platform's Redis
            "CIPHERPOOL_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
            "CIPHERPOOL_RECONCILE_INTERVAL_S": str(RECONCILE_S),
            "CIPHERPOOL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
            "CIPHERPOOL_REDELIVERY_GRACE_S": str(REDELIVERY_GRACE_S),
            "CIPHERPOOL_NODE_HOOKS": "tests.integration.hosts:HeldQuery",
            HOLD_ENV: str(HOLD_S),
        }
        if host in NODE_PROFILE:  # each host has its own copy of the profiles file, as on real hosts
            (data / "profiles.toml").write_text(PROFILES)
            env["CIPHERPOOL_NODE_PROFILE"] = NODE_PROFILE[host]
        return env

    def start(self, host: str, argv: list[str]) -> Any:
        """``argv`` in ``host``'s namespace (``ip netns exec`` execs in place: the pid is the process's)."""
        child = self.supervisor.start(host, self.hosts[host].command(argv), self.env(host))
        self.children[host] = child
        return child

    def start_all(self) -> None:
        from cipherpool.config.profiles import load_profiles, node_command
        from cipherpool.names import CONTROL_QUEUE
        from cipherpool.stack.embedded import CELERY, CONTROL_CONCURRENCY, GATEWAY

        quiet = ["--without-gossip", "--without-mingle"]
        gateway = self.hosts["gateway"].address
        self.start("gateway", GATEWAY + ["--host", gateway, "--port", str(self.gateway_port), "--log-level", "info"])
        control = ["worker", "-Q", CONTROL_QUEUE, "-P", "threads", "-c", str(CONTROL_CONCURRENCY), "-n", node("control")]
        self.start("control", CELERY + control + quiet + ["--loglevel", "INFO"])
        self.start("beat", CELERY + ["beat", "-s", str(self.root / "beat" / "celerybeat-schedule"), "--loglevel", "INFO"])
        (self.root / "profiles.toml").write_text(PROFILES)
        profiles = load_profiles(self.root / "profiles.toml")
        for host, profile in NODE_PROFILE.items():
            self.start(host, node_command(profiles[profile], node(host)) + quiet)

    # What the operator sees, on the services' side.
    def celery(self) -> Any:
        from cipherpool.config.celery import create_app

        return create_app(Settings(broker_url=self.operator_broker, result_backend=self.redis.url()), name="hosts-apart")

    def node_row(self, host: str) -> Any:
        from cipherpool.db import session_scope
        from cipherpool.db.tables import PoolNode

        with session_scope(self.database) as s:
            row = s.get(PoolNode, node(host))
            if row is not None:
                s.expunge(row)
            return row

    def registered(self, host: str) -> bool:
        """Online in the database, registered by the very process started for it (its pid)."""
        from cipherpool.db.tables import NodeStatus

        row = self.node_row(host)
        return row is not None and row.status == NodeStatus.ONLINE and row.pid == self.children[host].pid

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.gateway + "/v1/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def wait_up(self, app: Any) -> None:
        def up() -> bool:
            dead = [c.name for c in self.supervisor.dead()]
            if dead:
                raise AssertionError(f"{dead} exited at start; logs in {self.supervisor.log_dir}")
            return (
                all(self.registered(h) for h in NODE_PROFILE)
                and self.ready()
                and bool(app.control.ping(destination=[node("control")], timeout=0.5))
            )

        wait_until(
            up, START_S, interval_s=0.5, error=AssertionError(f"not up within {START_S:g} s; see {self.supervisor.log_dir}")
        )

    def computed_by(self, query_id: str) -> str | None:
        import redis

        from cipherpool.gateway.results import computed_by

        with redis.Redis.from_url(self.redis.url(), socket_timeout=5) as client:
            return computed_by(client, query_id)

    def logged(self, text: str) -> int:
        """Lines of every component's log that contain ``text``."""
        logs = Path(self.supervisor.log_dir).glob("*.log")
        return sum(line.count(text) for path in logs for line in path.read_text(errors="replace").splitlines())

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for path in sorted(Path(self.supervisor.log_dir).glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)


def just_taken(app: Any, host: str, within_s: float = 0.2) -> list[str]:
    """The ids of the queries ``host``'s node started less than ``within_s`` ago, as it answers
    a broker inspect: such a query holds the node for HOLD_S yet, so a fault striking now finds
    it in the node's hands (taken from the broker, not acknowledged, no result written)."""
    from cipherpool.names import QUERY_TASK

    replies = app.control.inspect(destination=[node(host)], timeout=1.0, limit=1).active() or {}
    return [
        t["id"]
        for t in replies.get(node(host), [])
        if t.get("type") == QUERY_TASK and time.time() - (t.get("time_start") or 0) < within_s
    ]


def consumed_queues(app: Any, host: str) -> set[str] | None:
    """The queues ``host``'s node consumes, as it answers (None: it did not answer)."""
    replies = app.control.inspect(destination=[node(host)], timeout=1.0, limit=1).active_queues() or {}
    if node(host) not in replies:
        return None
    return {q["name"] for q in replies[node(host)]}


@contextlib.contextmanager
def platform(broker: str, hosts: dict[str, netns.Namespace], root: Path) -> Iterator[Platform]:
    """Redis, a database and (RabbitMQ) a vhost of this run's own, relays from each host's
    address to the loopback-only services, then every platform process in its namespace; all
    stopped and removed afterwards (processes by pid first)."""
    from sqlalchemy.engine import make_url

    from cipherpool.db import init_db
    from cipherpool.stack.supervisor import Supervisor, free_port

    if broker == "rabbitmq":
        reason = rabbitmq_unavailable()
        if reason:
            pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(_postgres_database())
        init_db(database)
        vhost = ""
        if broker == "rabbitmq":
            try:
                remove_stale_vhosts(VHOST_PREFIX)
                vhost = stack.enter_context(rabbitmq_vhost(VHOST_PREFIX))
            except Exception as exc:  # noqa: BLE001 - a RabbitMQ this test may not configure: say why
                pytest.skip(f"cannot make a RabbitMQ vhost with rabbitmqctl: {getattr(exc, 'stderr', '') or exc}")
        supervisor = Supervisor(root / "logs")
        redis = own_redis(root, bind=tuple(ns.host_address for ns in hosts.values())).start(supervisor)
        stack.callback(supervisor.stop_all, 15)  # Redis, should a relay fail to open
        links: dict[str, dict[str, str]] = {}
        admin = make_url(database)
        for host, ns in hosts.items():
            db_relay = stack.enter_context(netns.TcpRelay((ns.host_address, 0), (admin.host or "127.0.0.1", admin.port or 5432)))
            store = redis.url(ns.host_address)
            if broker == "rabbitmq":
                mq_relay = stack.enter_context(netns.TcpRelay((ns.host_address, 0), RABBITMQ))
                broker_url = f"amqp://guest:guest@{mq_relay.address[0]}:{mq_relay.address[1]}/{vhost}"
            else:
                broker_url = store
            links[host] = {
                "CIPHERPOOL_BROKER_URL": broker_url,
                "CIPHERPOOL_RESULT_BACKEND": store,
                "CIPHERPOOL_STORE_URL": store,
                "CIPHERPOOL_DATABASE_URL": make_url(database)
                .set(host=db_relay.address[0], port=db_relay.address[1])
                .render_as_string(hide_password=False),
            }
        stack.callback(supervisor.stop_all, 15)  # first out: every process, before relays, vhost, database
        operator_broker = redis.url() if broker == "redis" else f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{vhost}"
        (root / "beat").mkdir()
        p = Platform(root, broker, hosts, redis, database, operator_broker, links, supervisor, free_port())
        try:
            yield p
        finally:
            for ns in hosts.values():
                ns.heal()  # a failed test may have left one cut off


# --- the end user's queries ------------------------------------------------------------------


@dataclass
class Sent:
    sample: int
    handle: Any  # QueryHandle
    output: bytes | None = None
    error: str | None = None
    node: str | None = None
    done: bool = False

    @property
    def id(self) -> str:
        return str(self.handle.id)


class Queries:
    """One end user's queries to one model: ciphertexts made once, each sent query waited on by
    a pool thread (many in flight at once), answers decrypted and checked in the test's thread."""

    def __init__(self, p: Platform, qc: QueryClient, example: Any, pool: ThreadPoolExecutor):
        self.p, self.qc, self.pool = p, qc, pool
        xs = example.x_test[:SAMPLES]
        self.ciphertexts = [qc.encrypt(x) for x in xs]
        self.expected = example.clear(xs)
        self.sent: list[Sent] = []

    def send(self, n: int) -> list[Sent]:
        batch = []
        for _ in range(n):
            sample = len(self.sent) % SAMPLES
            sent = Sent(sample, self.qc.submit(self.ciphertexts[sample]))  # every submit must be accepted
            self.sent.append(sent)
            batch.append(sent)
            self.pool.submit(self._wait, sent)
        return batch

    def _wait(self, sent: Sent) -> None:
        try:
            sent.output = sent.handle.result(QUERY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - judged in check()
            sent.error = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
        if sent.output is not None:
            with contextlib.suppress(Exception):
                sent.node = self.p.computed_by(sent.id)
        sent.done = True

    def check(self, batch: list[Sent], timeout_s: float = QUERY_TIMEOUT_S + 30) -> Counter[str | None]:
        """Every query of ``batch`` answered, each answer the clear model's; by which node."""
        with contextlib.suppress(WaitTimeout):  # a query still unanswered then is reported below
            wait_until(lambda: all(s.done for s in batch), timeout_s, interval_s=0.1)
        unanswered = [f"{s.id}: {s.error or 'no answer yet'}" for s in batch if s.output is None]
        assert not unanswered, f"{len(unanswered)} of {len(batch)} queries not answered: {unanswered}"
        for s in batch:
            assert s.output is not None
            got = self.qc.decrypt(s.output)
            assert np.allclose(got, self.expected[s.sample : s.sample + 1], atol=ATOL), (s.id, got)
        return Counter(s.node for s in batch)


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float = FAULT_S, interval_s: float = 0.2) -> Any:
    return wait_until(predicate, timeout_s, interval_s=interval_s, error=AssertionError(f"{what}: not within {timeout_s:g} s"))


def up_worker(mc: ManagementClient, model: str, other_than: set[str]) -> Any:
    return next((w for w in mc.list_workers(model) if w.status == WorkerStatus.UP and w.id not in other_than), None)


def free(mc: ManagementClient, host: str) -> bool:
    """The operator's and provider's view: the node online, bound to no worker, all its slots free."""
    listed = next((n for n in mc.list_nodes() if n.name == node(host)), None)
    return listed is not None and listed.status == "online" and not listed.busy and listed.allocatable == listed.capacity


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_hosts_apart_serve_through_a_node_kill_and_a_partition(broker, hosts, cancer, tmp_path):
    began = time.monotonic()
    times: dict[str, float] = {}

    def mark(what: str) -> None:
        times[what] = time.monotonic() - began

    facts: dict[str, str] = {}
    with platform(broker, hosts, tmp_path) as p, contextlib.ExitStack() as clients:
        try:
            _run(p, cancer, clients, mark, facts)
        except BaseException:
            print(f"\n{broker}: component logs (tails), all in {p.supervisor.log_dir}:\n{p.log_tails()}")
            raise
    mark("stopped")
    print(f"\nhosts apart, {broker}: " + ", ".join(f"{what} {t:.1f} s" for what, t in times.items()))
    print(f"hosts apart, {broker}: " + ", ".join(f"{what}: {value}" for what, value in facts.items()))


def _run(p: Platform, example: Any, clients: contextlib.ExitStack, mark: Callable[[str], None], facts: dict[str, str]) -> None:
    from cipherpool.db import session_scope
    from cipherpool.names import model_queue
    from cipherpool.services.accounts import create_account

    # Given the platform as six hosts, each in its namespace, started by `cipherpool up`'s lines
    p.start_all()
    app = p.celery()
    clients.callback(app.close)
    p.wait_up(app)
    mark("up")
    assert all(p.children[h].pid in p.hosts[h].pids() for h in p.hosts)  # each process in its host's namespace

    # And a provider (through the gateway only) with a model bound to each host class
    with session_scope(p.database) as s:
        api_key = create_account(s, "provider", signup_grant=10**6)[1]
    settings = Settings(url=p.gateway, data_dir=p.root / "client", query_timeout_s=QUERY_TIMEOUT_S)
    mc = clients.enter_context(ManagementClient(api_key, settings=settings))
    for name, hardware in (("cancer-cpu", "cpu"), ("cancer-gpu", "gpu")):
        mc.deploy_model(name, example.path, hardware=hardware, max_workers=2)
        mc.activate_model(name)
    cpu_worker = mc.start_worker("cancer-cpu")
    gpu_worker = mc.start_worker("cancer-gpu")
    assert cpu_worker.node == node("cpu1")
    assert gpu_worker.node in {node(h) for h in GPU_NODES}
    first = gpu_worker.node.split("@")[0]
    (second,) = set(GPU_NODES) - {first}
    # A gpu node is free, yet the cpu model is not started there: the only cpu node is taken.
    with pytest.raises(errors.NoFreeNode):
        mc.start_worker("cancer-cpu")
    gpu_model = mc.get_model("cancer-gpu")

    # And end users with keys uploaded (queries wait for a worker while a fault has none up)
    pool = ThreadPoolExecutor(48, thread_name_prefix="hosts-apart")
    clients.callback(pool.shutdown, wait=False, cancel_futures=True)
    users = {}
    for name in ("cancer-cpu", "cancer-gpu"):
        qc = clients.enter_context(
            QueryClient(
                mc.create_token(f"user-{name}", model=name), settings=settings, key_dir=p.root / name, wait_for_worker=True
            )
        )
        qc.generate_keys()
        qc.upload_evaluation_keys()
        users[name] = Queries(p, qc, example, pool)
    cpu, gpu = users["cancer-cpu"], users["cancer-gpu"]
    mark("served")

    # Then each model is served on its class only, every answer the clear model's
    assert cpu.check(cpu.send(3)) == {node("cpu1"): 3}
    assert gpu.check(gpu.send(3)) == {node(first): 3}
    mark("routed")

    # When the gpu node serving the model is SIGKILLed with queries in flight
    burst, others = gpu.send(BURST), cpu.send(2)
    held = wait_for(f"{first} taking a query", lambda: just_taken(app, first), 20, 0.02)
    victim = p.children[first]
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    assert sum(not s.done for s in burst) >= 2, "the kill met no queries in flight"
    mark("killed")

    # Then its worker is failed and replaced on the other gpu node, never on the cpu node
    wait_for("the killed node's worker failed", lambda: mc.get_worker(gpu_worker.id).status == WorkerStatus.FAILED)
    replacement = wait_for("a replacement up", lambda: up_worker(mc, "cancer-gpu", {gpu_worker.id}))
    assert replacement.node == node(second)
    mark("replaced")
    # And the host comes back (restarted as `cipherpool up` restarts a child that exits)
    restarted, given_up = p.supervisor.restart_dead()
    assert ([c.name for c in restarted], given_up) == ([first], [])
    # And every query is answered correctly: the one the node held redelivered to the other node
    by = gpu.check(burst)
    assert set(by) <= {node(first), node(second)} and by[node(second)] >= 1, by
    assert {s.node for s in burst if s.id in held} == {node(second)}, (held, [(s.id, s.node) for s in burst])
    assert cpu.check(others) == {node("cpu1"): 2}
    mark("answered after the kill")
    # And the restarted node registers and stays free: its worker was failed while it was away
    wait_for("the restarted node registered", lambda: p.registered(first), START_S, 0.5)
    wait_for("the restarted node free", lambda: free(mc, first))
    mark("killed node back, free")

    # When the node now serving is cut off from everything for longer than three heartbeats,
    # with a query in its hands and more sent as the link goes down: the first of those is
    # handed to the node as it waits for work (its second slot), which on Redis the node may
    # never receive (sent again by beat), on RabbitMQ holds until the network heals
    lead, others = gpu.send(1), cpu.send(2)
    held = wait_for(f"{second} taking a query", lambda: just_taken(app, second), 20, 0.02)
    apart, pid = p.hosts[second], p.children[second].pid
    apart.partition()
    cut = time.monotonic()
    burst = gpu.send(BURST)
    assert not lead[0].done, "the partition met no query in the node's hands"
    mark("partitioned")
    # Then its worker is failed and replaced on the restarted node, which serves meanwhile
    wait_for("the partitioned node's worker failed", lambda: mc.get_worker(replacement.id).status == WorkerStatus.FAILED)
    second_replacement = wait_for("a replacement up", lambda: up_worker(mc, "cancer-gpu", {gpu_worker.id, replacement.id}))
    assert second_replacement.node == node(first)
    during = gpu.send(2)
    time.sleep(max(0.0, 3 * HEARTBEAT_S + 2 - (time.monotonic() - cut)))
    assert apart.partitioned()
    apart.heal()
    lasted = time.monotonic() - cut
    facts["partition"] = f"{lasted:.1f} s"
    mark("healed")
    assert lasted > 3 * HEARTBEAT_S
    # And every query is answered correctly
    by = gpu.check(lead + burst + during)
    assert set(by) <= {node(first), node(second)} and by[node(first)] >= 1, by
    assert held == [lead[0].id]
    assert cpu.check(others) == {node("cpu1"): 2}
    mark("answered after the partition")
    # And the node is alive (the same process), heard again, and free: it let its failed worker go
    assert p.children[second].alive() and p.children[second].pid == pid
    wait_for("the healed node registered again", lambda: p.registered(second), START_S, 0.5)
    queue = model_queue("gpu", gpu_model.id)
    wait_for("the healed node stops consuming the model's queue", lambda: queue not in (consumed_queues(app, second) or {queue}))
    wait_for("the healed node free", lambda: free(mc, second))
    mark("healed node free")
    # And it serves again: a new worker of the model can only land there, and answers
    third = mc.start_worker("cancer-gpu", timeout=FAULT_S)
    assert third.node == node(second)
    mc.stop_worker(second_replacement.id, timeout=FAULT_S)
    assert gpu.check(gpu.send(2)) == {node(second): 2}
    mark("healed node serves")

    # And no gpu-model worker was ever on the cpu node, whose own worker served throughout
    assert {w.node for w in mc.list_workers("cancer-gpu")} <= {node(h) for h in GPU_NODES}
    assert mc.get_worker(cpu_worker.id).status == WorkerStatus.UP
    assert all(s.output is not None for q in (cpu, gpu) for s in q.sent)
    facts["queries answered correctly"] = str(sum(len(q.sent) for q in (cpu, gpu)))
    facts["sent again by beat (Redis: lost on the way)"] = str(p.logged("sent again to"))
