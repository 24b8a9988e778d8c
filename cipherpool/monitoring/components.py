"""The platform's own health in one view: every component, its state and why.

What `cipherpool status`, ``GET /v1/platform/status``, the ``/metrics`` health families and
every gateway's watchdog read, so they never disagree. Two steps, so the rule can be tested
with a clock of the test's choosing:

* :func:`observe` reads (blocking): the heartbeats of gateways, control workers and beat
  (:mod:`.heartbeats`), when each of beat's jobs last ran (:mod:`.beat_jobs`), pool nodes
  from the database, Redis's ``INFO memory``, the latest platform events. A part that cannot
  be read (Redis or the database down) is reported as such, never raised, because a status
  view is needed most when something is down.
* :func:`evaluate` judges (pure, ``now`` passed in) with :func:`.liveness.judge`: replicas
  (gateways, control workers, nodes) are as healthy as their best instance, beat as its worst
  part (its process and each job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis import Redis
from sqlmodel import Session, col, select

from cipherpool.api.schemas import (
    BeatJobHealth,
    ComponentHealth,
    NodeHealth,
    PlatformEventOut,
    PlatformStatus,
    ProcessHealth,
    StoreHealth,
)
from cipherpool.clock import aware
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db.tables import PoolNode, Worker
from cipherpool.monitoring import beat_jobs, heartbeats, platform_events
from cipherpool.monitoring.heartbeats import ProcessBeat, Role
from cipherpool.monitoring.liveness import best, judge, worst
from cipherpool.services.nodes import NODE_STALE_HEARTBEATS, published_models
from cipherpool.statuses import Component, ComponentState, NodeStatus

DEFAULT_EVENTS = 10  # platform events a status carries, newest first


@dataclass(frozen=True)
class NodeSeen:
    """A pool node's row, as read (``last_seen`` in unix seconds)."""

    name: str
    host: str
    host_class: str
    shared: bool
    status: NodeStatus
    last_seen: float
    bound_models: int


@dataclass
class Observed:
    """Everything :func:`evaluate` judges, read at one moment."""

    processes: dict[Role, list[ProcessBeat]] = field(default_factory=dict)
    job_runs: dict[str, float] = field(default_factory=dict)  # task -> unix time of its last run
    nodes: list[NodeSeen] = field(default_factory=list)
    used_memory: int | None = None
    maxmemory: int | None = None
    events: list[PlatformEventOut] = field(default_factory=list)
    store_error: str | None = None  # Redis could not be read: heartbeats and job runs are unknown
    database_error: str | None = None


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def read_nodes(session: Session, redis: Redis | None) -> list[NodeSeen]:
    """Every pool node with how many models it holds: its worker's (dedicated), or those it
    says it holds loaded (shared; needs Redis)."""
    rows = session.exec(
        select(PoolNode, Worker).outerjoin(Worker, col(Worker.id) == PoolNode.worker_id).order_by(PoolNode.name)
    ).all()
    seen = []
    for node, worker in rows:
        if node.shared:
            bound = len(published_models(redis, node.name)) if redis is not None else 0
        else:
            bound = int(worker is not None and worker.status.holds_node)
        seen.append(
            NodeSeen(
                node.name,
                node.host,
                node.host_class,
                node.shared,
                NodeStatus(node.status),
                aware(node.last_seen).timestamp(),
                bound,
            )
        )
    return seen


def observe(ctx: PlatformContext, events: int = DEFAULT_EVENTS) -> Observed:
    """Read every component's traces (blocking): Redis, then the database."""
    seen = Observed()
    redis: Redis | None = None
    try:
        redis = ctx.store.redis
        seen.processes = {role: heartbeats.read(redis, role) for role in Role}
        seen.job_runs = beat_jobs.last_runs(redis)
        memory = redis.info("memory")
        seen.used_memory, seen.maxmemory = int(memory["used_memory"]), int(memory["maxmemory"])
        seen.events = platform_events.latest(redis, events)
    except Exception as exc:  # noqa: BLE001 - Redis down is what this view must show
        seen.store_error = _error(exc)
    try:
        with ctx.session() as session:
            seen.nodes = read_nodes(session, redis if seen.store_error is None else None)
    except Exception as exc:  # noqa: BLE001 - so is a database down
        seen.database_error = _error(exc)
    return seen


def _moment(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _seconds(age_s: float) -> str:
    if age_s < 120:
        return f"{age_s:.1f} s"
    if age_s < 7200:
        return f"{age_s / 60:.0f} min"
    return f"{age_s / 3600:.1f} h"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def process_health(role: Role, beat: ProcessBeat, now: float) -> ProcessHealth:
    age = max(0.0, now - beat.seen)  # a writer's clock a little ahead reads as just now
    return ProcessHealth(
        role=role.value,
        instance=beat.instance,
        host=beat.host,
        pid=beat.pid,
        version=beat.version,
        started_at=_moment(beat.started),
        last_seen=_moment(beat.seen),
        age_s=round(age, 1),
        interval_s=beat.interval_s,
        state=judge(age, beat.interval_s),
    )


def replicas(component: Component, what: str, found: list[ProcessHealth], unknown: str | None) -> ComponentHealth:
    """Gateways or control workers: as healthy as the best one; each unhealthy one named."""
    state = best(p.state for p in found)
    if unknown is not None:
        return ComponentHealth(component=component, state=state, detail=f"unknown: the store is unreachable ({unknown})")
    if not found:
        return ComponentHealth(component=component, state=state, detail=f"no {what} heard from in the last hour")
    well = sum(p.state is ComponentState.OK for p in found)
    unwell = "; ".join(
        f"{p.instance} {p.state.value}, last seen {_seconds(p.age_s)} ago" for p in found if p.state is not ComponentState.OK
    )
    return ComponentHealth(
        component=component, state=state, detail=f"{well} of {len(found)} ok" + (f"; {unwell}" if unwell else "")
    )


def job_health(
    jobs: list[beat_jobs.BeatJob], runs: dict[str, float], beat_started: float | None, now: float
) -> list[BeatJobHealth]:
    """Each job's age: since its last run; never run, since beat started (it is owed from then)."""
    judged = []
    for job in jobs:
        last = runs.get(job.task)
        since = last if last is not None else beat_started
        age = None if since is None else max(0.0, now - since)
        judged.append(
            BeatJobHealth(
                job=job.name,
                task=job.task,
                interval_s=job.interval_s,
                last_run=_moment(last) if last is not None else None,
                age_s=round(age, 1) if age is not None else None,
                state=judge(age, job.interval_s),
            )
        )
    return judged


def _last_ran(job: BeatJobHealth) -> str:
    if job.age_s is None:
        return "never ran, and no beat heard from"
    if job.last_run is None:
        return f"never ran in the {_seconds(job.age_s)} since beat started"
    return f"last ran {_seconds(job.age_s)} ago"


def beat_component(beats: list[ProcessHealth], jobs: list[BeatJobHealth], unknown: str | None) -> ComponentHealth:
    process = best(b.state for b in beats)
    state = worst([process, *(j.state for j in jobs)])
    if unknown is not None:
        return ComponentHealth(component=Component.BEAT, state=state, detail=f"unknown: the store is unreachable ({unknown})")
    parts = [
        f"beat {beats[0].instance} {process.value}, last seen {_seconds(beats[0].age_s)} ago"
        if beats
        else "no beat heard from in the last hour"
    ]
    overdue = [j for j in jobs if j.state is not ComponentState.OK]
    if overdue:
        parts.append("jobs " + ", ".join(f"{j.job} {j.state.value} ({_last_ran(j)}; every {j.interval_s:g} s)" for j in overdue))
    else:
        parts.append(f"all {len(jobs)} jobs on time")
    return ComponentHealth(component=Component.BEAT, state=state, detail="; ".join(parts))


def node_health(node: NodeSeen, heartbeat_s: float, now: float) -> NodeHealth:
    age = max(0.0, now - node.last_seen)
    if node.status is NodeStatus.OFFLINE:
        status, state = "offline", ComponentState.MISSING
    else:
        status = "lost" if age > heartbeat_s * NODE_STALE_HEARTBEATS else "online"
        state = judge(age, heartbeat_s)
    return NodeHealth(
        name=node.name,
        host=node.host,
        host_class=node.host_class,
        shared=node.shared,
        status=status,
        heartbeat_age_s=round(age, 1),
        bound_models=node.bound_models,
        state=state,
    )


def nodes_component(nodes: list[NodeHealth], database_error: str | None) -> ComponentHealth:
    state = best(n.state for n in nodes)
    if database_error is not None:
        detail = f"unknown: the database is unreachable ({database_error})"
    elif not nodes:
        detail = "no pool node registered"
    else:
        online = sum(n.status == "online" for n in nodes)
        unwell = ", ".join(f"{n.name} {n.status}" for n in nodes if n.status != "online")
        detail = f"{online} of {len(nodes)} online" + (f"; {unwell}" if unwell else "")
    return ComponentHealth(component=Component.NODES, state=state, detail=detail)


def store_health(seen: Observed) -> StoreHealth:
    if seen.store_error is not None:
        return StoreHealth(
            reachable=False,
            used_memory_bytes=None,
            maxmemory_bytes=None,
            memory_ratio=None,
            error=seen.store_error,
            state=ComponentState.MISSING,
        )
    ratio = seen.used_memory / seen.maxmemory if seen.used_memory is not None and seen.maxmemory else None
    return StoreHealth(
        reachable=True,
        used_memory_bytes=seen.used_memory,
        maxmemory_bytes=seen.maxmemory,
        memory_ratio=round(ratio, 4) if ratio is not None else None,
        error=None,
        state=ComponentState.OK,
    )


def store_component(store: StoreHealth) -> ComponentHealth:
    if not store.reachable:
        return ComponentHealth(component=Component.STORE, state=store.state, detail=f"unreachable: {store.error}")
    used = _bytes(store.used_memory_bytes or 0)
    bound = f" of {_bytes(store.maxmemory_bytes)} ({store.memory_ratio:.1%})" if store.maxmemory_bytes else " (no bound)"
    return ComponentHealth(component=Component.STORE, state=store.state, detail=f"memory {used}{bound}")


def evaluate(seen: Observed, settings: Settings, now: float) -> PlatformStatus:
    """Judge what was observed at ``now`` (unix seconds)."""
    found = {role: [process_health(role, b, now) for b in seen.processes.get(role, [])] for role in Role}
    beats = sorted(found[Role.BEAT], key=lambda b: b.last_seen, reverse=True)  # the live one first
    started = max((b.started for b in seen.processes.get(Role.BEAT, [])), default=None)
    jobs = job_health(beat_jobs.schedule(settings), seen.job_runs, started, now)
    nodes = [node_health(n, settings.node_heartbeat_s, now) for n in seen.nodes]
    store = store_health(seen)
    database = ComponentHealth(
        component=Component.DATABASE,
        state=ComponentState.MISSING if seen.database_error else ComponentState.OK,
        detail=f"unreachable: {seen.database_error}" if seen.database_error else "reachable",
    )
    components = [
        replicas(Component.GATEWAY, "gateway", found[Role.GATEWAY], seen.store_error),
        replicas(Component.CONTROL, "control worker", found[Role.CONTROL], seen.store_error),
        beat_component(beats, jobs, seen.store_error),
        nodes_component(nodes, seen.database_error),
        store_component(store),
        database,
    ]
    return PlatformStatus(
        at=_moment(now),
        state=worst(c.state for c in components),
        components=components,
        gateways=found[Role.GATEWAY],
        control_workers=found[Role.CONTROL],
        beats=beats,
        beat_jobs=jobs,
        nodes=nodes,
        store=store,
        events=seen.events,
    )


def read_status(ctx: PlatformContext, now: float, events: int = DEFAULT_EVENTS) -> PlatformStatus:
    """Observe and judge (blocking)."""
    return evaluate(observe(ctx, events), ctx.settings, now)
