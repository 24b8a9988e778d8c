"""Pool nodes: registration, heartbeats and liveness.

A pool node is a persistent ``celery worker`` process that registers itself when ready,
heartbeats while it runs and is marked offline when it stops. Which model it serves is the
worker (binding) lifecycle's business (:mod:`cipherpool.services.workers`); this module only
answers "which nodes exist, and which are alive?".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, update
from sqlmodel import Session, col, select

from cipherpool import backends
from cipherpool.api.schemas import NodeOut, NodeResources, SharedModelOut
from cipherpool.backends import gpu
from cipherpool.billing import charging, rates
from cipherpool.billing.rates import PriceChange
from cipherpool.clock import aware, utcnow
from cipherpool.db.tables import Model, NodeStatus, PoolNode, Worker
from cipherpool.names import SHARED_LOADED_PREFIX
from cipherpool.services import events
from cipherpool.statuses import HOLDING_NODE, EventKind

NODE_STALE_HEARTBEATS = 3  # a node unseen for this many heartbeats is not offered


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself when it registers: its profile and its host's capacity."""

    host_class: str
    concurrency: int
    threads: int | None
    pid: int
    profile: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    shared: bool = False
    host: str = ""
    cores: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    capabilities: tuple[str, ...] = (backends.DEFAULT_BACKEND,)  # backends.probe(host_class) on the node
    key_cache_bytes: int = 0
    prices: PriceChange | None = None  # its profile's own rates (None fields: its class's)


@dataclass(frozen=True)
class Downtime:
    """A node came back holding its worker: it was silent from ``since`` (its last heartbeat)
    to ``until`` (its registration), time the worker is not charged for."""

    worker_id: str
    node: str
    since: datetime
    until: datetime

    @property
    def seconds(self) -> float:
        return (self.until - self.since).total_seconds()

    def describe(self) -> str:
        """The line its event and the worker's log say."""
        return (
            f"node {self.node} restarted holding worker {self.worker_id}: down {self.seconds:.1f} s "
            f"(no heartbeat since {self.since.isoformat()}), not charged"
        )


@dataclass(frozen=True)
class Registration:
    """A registered node, and the downtime of the worker it still holds, if any (for its log)."""

    node: PoolNode
    downtime: Downtime | None = None


def register_node(session: Session, name: str, info: NodeInfo, now: datetime | None = None) -> PoolNode:
    """Record a node that is ready (see :func:`register`)."""
    return register(session, name, info, now).node


def register(session: Session, name: str, info: NodeInfo, now: datetime | None = None) -> Registration:
    """Record a node that is ready (at ``now``): its profile, capacity and prices. A node that
    restarted while a worker still holds it (within the loss window, before the reconciler
    failed it) rebinds it; that worker is charged up to the node's last heartbeat and not for
    the time it was down, which its model's events record."""
    now = aware(now or utcnow())
    node = session.get(PoolNode, name)
    downtime = skip_downtime(session, node, now) if node is not None else None  # priced as the node was
    if node is None:  # a first registration, or a row that was lost: the worker it holds says it is bound
        node = PoolNode(name=name, worker_id=_held_by(session, name))
    node.host_class, node.concurrency, node.threads, node.pid = info.host_class, info.concurrency, info.threads, info.pid
    node.profile, node.labels, node.shared, node.host = (
        info.profile,
        json.dumps(dict(info.labels), sort_keys=True),
        info.shared,
        info.host,
    )
    node.cores, node.memory_bytes, node.gpus, node.key_cache_bytes = (
        info.cores,
        info.memory_bytes,
        info.gpus,
        info.key_cache_bytes,
    )
    node.capabilities = json.dumps(list(info.capabilities))
    node.status = NodeStatus.ONLINE
    node.started_at = node.last_seen = now
    session.add(node)
    if info.prices is not None:  # a profile's rate that changed applies from now on
        rates.sync(session, rates.profile_scope(info.profile), info.prices, f"profile {info.profile} ({name})")
    return Registration(node, downtime)


def skip_downtime(session: Session, node: PoolNode, now: datetime) -> Downtime | None:
    """The worker the node still holds, charged up to its last heartbeat, the silence since not
    owed; the downtime, recorded as its model's event. None if it holds none."""
    # Locked and read fresh: a reconciler that failed it meanwhile (committed while this waited)
    # charged it already, and its downtime is no longer this node's to skip.
    worker = charging.lock_worker(session, node.worker_id) if node.worker_id else None
    since = aware(node.last_seen)
    if worker is None or not worker.status.holds_node or since >= now:
        return None
    charging.skip_silence(session, worker.id, since, now)
    downtime = Downtime(worker.id, node.name, since, now)
    events.record_for(session, worker.model_id, EventKind.WORKER_DOWNTIME, downtime.describe(), worker_id=worker.id)
    return downtime


def _held_by(session: Session, name: str) -> str | None:
    """The worker that holds node ``name`` by the workers' own rows (its node row may be gone)."""
    return session.exec(
        select(Worker.id)
        .where(Worker.node_name == name, col(Worker.status).in_(HOLDING_NODE))
        .order_by(col(Worker.created_at).desc())
    ).first()


def heartbeat(session: Session, name: str) -> bool:
    """The node is alive now; False if it has no row (never registered, or the row was lost:
    it must register again)."""
    result = session.execute(
        update(PoolNode).where(col(PoolNode.name) == name).values(last_seen=utcnow(), status=NodeStatus.ONLINE)
    )
    return bool(getattr(result, "rowcount", 1))


def node_offline(session: Session, name: str) -> None:
    session.execute(update(PoolNode).where(col(PoolNode.name) == name).values(status=NodeStatus.OFFLINE))


def live(heartbeat_s: float) -> ColumnElement[bool]:
    """SQL condition: the node says it is online and was heard from recently."""
    fresh = utcnow() - timedelta(seconds=heartbeat_s * NODE_STALE_HEARTBEATS)
    return (col(PoolNode.status) == NodeStatus.ONLINE) & (col(PoolNode.last_seen) >= fresh)


def node_is_live(session: Session, name: str, heartbeat_s: float) -> bool:
    return session.exec(select(PoolNode.name).where(PoolNode.name == name, live(heartbeat_s))).first() is not None


def binding_of_node(session: Session, node_name: str) -> tuple[Worker, Model] | None:
    """The binding a (re)started node should serve, if any."""
    node = session.get(PoolNode, node_name)
    if node is None or node.worker_id is None:
        return None
    worker = session.get(Worker, node.worker_id)
    if worker is None or not worker.status.holds_node:
        return None
    model = session.get(Model, worker.model_id)
    return (worker, model) if model else None


def still_wanted(session: Session, worker_id: str) -> bool:
    """Should the node holding ``worker_id`` keep it? Not once it is stopping, stopped or failed."""
    worker = session.get(Worker, worker_id)
    return worker is not None and worker.status.wanted


def list_nodes(
    session: Session,
    heartbeat_s: float,
    account_id: str | None = None,
    held: Callable[[str], Mapping[tuple[str, int], int]] | None = None,
) -> list[NodeOut]:
    """Every pool node with its capacity and what is left of it. ``account_id``: a provider's
    view, which names only its own workers and models (another account's binding is ``busy``).
    ``held``: what a shared node says it holds loaded, ``(model id, version) -> bytes``
    (:func:`published_models`)."""
    rows = session.exec(
        select(PoolNode, Worker, Model)
        .outerjoin(Worker, col(Worker.id) == PoolNode.worker_id)
        .outerjoin(Model, col(Model.id) == Worker.model_id)
        .order_by(PoolNode.name)
    ).all()
    listed = []
    for node, worker, model in rows:
        out = describe_node(node, worker, model, heartbeat_s, account_id)
        if node.shared and held is not None and out.status == "online":
            out = out.model_copy(update={"shared_models": shared_models(session, held(node.name), account_id)})
        listed.append(out)
    return listed


def shared_models(session: Session, held: Mapping[tuple[str, int], int], account_id: str | None) -> list[SharedModelOut]:
    """The loaded models of a shared node by name, version and memory; a provider sees its own."""
    if not held:
        return []
    query = select(Model).where(col(Model.id).in_({model_id for model_id, _ in held}))
    if account_id is not None:
        query = query.where(Model.account_id == account_id)
    names = {m.id: m.name for m in session.exec(query)}
    return sorted(
        (
            SharedModelOut(model=names[model_id], version=version, memory_bytes=size)
            for (model_id, version), size in held.items()
            if model_id in names
        ),
        key=lambda m: (m.model, m.version),
    )


def capabilities_of(node: PoolNode) -> frozenset[str]:
    """The backends a node said it can run when it registered (its ``capabilities`` column)."""
    try:
        found = json.loads(node.capabilities or "[]")
    except ValueError:
        return frozenset()
    return frozenset(str(name) for name in found) if isinstance(found, list) else frozenset()


def can_run(node: PoolNode, required: set[str] | frozenset[str]) -> bool:
    """Whether the node has every backend of ``required`` (what a model's versions were compiled for)."""
    return required <= capabilities_of(node)


def describe_node(
    node: PoolNode, worker: Worker | None, model: Model | None, heartbeat_s: float, account_id: str | None = None
) -> NodeOut:
    age = (utcnow() - aware(node.last_seen)).total_seconds()
    status = node.status.value
    if node.status == NodeStatus.ONLINE and age > heartbeat_s * NODE_STALE_HEARTBEATS:
        status = "lost"
    capacity = NodeResources(cores=node.cores, memory_bytes=node.memory_bytes, gpus=node.gpus, slots=node.concurrency)
    bound = worker is not None and worker.status.holds_node
    # A dedicated worker reserves the whole node: its slots, cores and GPUs, and its key cache.
    allocatable = (
        capacity
        if not bound
        else NodeResources(cores=0, memory_bytes=max(0, node.memory_bytes - node.key_cache_bytes), gpus=0, slots=0)
    )
    mine = bound and worker is not None and (account_id is None or worker.account_id == account_id)
    capabilities = capabilities_of(node)
    return NodeOut(
        name=node.name,
        host=node.host,
        profile=node.profile,
        host_class=node.host_class,
        labels=json.loads(node.labels or "{}"),
        shared=node.shared,
        status=status,
        threads=node.threads,
        capacity=capacity,
        allocatable=allocatable,
        capabilities=sorted(capabilities),
        gpu_build=gpu.BACKEND.name in capabilities,
        busy=bound,  # 0.7's field: capabilities say it for every backend
        model=model.name if mine and model else None,
        worker_id=worker.id if mine and worker else None,
        worker_status=worker.status.value if mine and worker else None,
        heartbeat_age_s=round(age, 1),
    )


def loaded_key(node: str) -> str:
    return f"{SHARED_LOADED_PREFIX}{node}"


def published_models(redis: Redis, node: str) -> dict[tuple[str, int], int]:
    """What a shared node says it holds: ``(model id, version) -> bytes``; {} if Redis cannot say."""
    try:
        raw = redis.hgetall(loaded_key(node))
    except RedisError:
        return {}
    held: dict[tuple[str, int], int] = {}
    for entry, size in raw.items():
        model_id, _, version = (entry.decode() if isinstance(entry, bytes) else str(entry)).rpartition(":")
        try:
            held[(model_id, int(version))] = int(size)
        except ValueError:
            continue
    return held
