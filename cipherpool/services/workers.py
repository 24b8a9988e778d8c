"""Workers: a model's serving units, each bound to one pool node while it runs.

The decisions about a worker live here, as plain functions over a session, so the gateway (for
a provider), beat jobs (schedules, credits, autoscaling) and the node itself make the same
checks. A binding claims its node with a conditional UPDATE, so two concurrent starts never
get the same node. Node registration and liveness are :mod:`cipherpool.services.nodes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlmodel import Session, col, select

from cipherpool import backends
from cipherpool.api.schemas import WorkerOut
from cipherpool.billing.charging import lock_worker, settle, skip_silence
from cipherpool.billing.gate import require_start_credit
from cipherpool.clock import aware, utcnow
from cipherpool.config.profiles import labels_match
from cipherpool.config.settings import get_settings
from cipherpool.db.tables import Account, Model, ModelStatus, NodeStatus, PoolNode, Worker, WorkerStatus
from cipherpool.errors import (
    BelowMinimum,
    InvalidInput,
    ModelInactive,
    NoFreeNode,
    WorkerLimit,
    WorkerNotFound,
    WorkerStartFailed,
    WrongWorkerState,
)
from cipherpool.services import events, rollout
from cipherpool.services.models import get_model, model_selector, required_backends
from cipherpool.services.nodes import can_run, capabilities_of, live, node_is_live
from cipherpool.statuses import WANTED, EventKind, StopReason

MAX_START = 64  # workers one start may ask for


def start_workers(
    session: Session,
    account: Account,
    model_name: str,
    heartbeat_s: float,
    *,
    count: int = 1,
    profile: str | None = None,
    standby: bool = False,
    credit_minutes: float | None = None,
    started_by: str = "user",
    schedule_id: str | None = None,
) -> list[Worker]:
    """Claim ``count`` free nodes of the model's host class (with its labels, of ``profile`` if
    given) for new workers (status PENDING); all or none. Refused with the reason: the model is
    not active, its ``max_workers`` would be passed, not enough nodes are free, or the balance
    does not cover ``credit_minutes`` (the settings' minimum) of the new workers."""
    model = get_model(session, account, model_name)
    # Concurrent starts of one model count its workers one after the other (max_workers).
    session.exec(select(Model).where(Model.id == model.id).with_for_update()).one()
    if model.status != ModelStatus.ACTIVE:
        raise ModelInactive(
            f"Model {model.name!r} is {model.status.value}: activate it before starting workers "
            f"(`cipherpool model activate {model.name}`)."
        )
    if not 1 <= count <= MAX_START:
        raise InvalidInput(f"count must be between 1 and {MAX_START}, not {count}.")
    have = len(serving(session, model_id=model.id))
    if have + count > model.max_workers:
        raise WorkerLimit(
            f"Model {model.name!r} may have at most {model.max_workers} worker(s) (max_workers) and has "
            f"{have}: stop one, or raise max_workers (`cipherpool model update {model.name} "
            f"--max-workers {have + count}`)."
        )
    free = free_nodes(session, model, heartbeat_s, profile)
    if len(free) < count:
        raise NoFreeNode(why_no_node(session, model, heartbeat_s, profile, count, len(free)))
    minutes = get_settings().credits_min_start_minutes if credit_minutes is None else credit_minutes
    require_start_credit(session, account, model, free[:count], minutes, standby)
    workers: list[Worker] = []
    for node in free:
        worker = Worker(
            account_id=account.id,
            model_id=model.id,
            node_name=node.name,
            profile=profile,
            standby=standby,
            started_by=started_by,
            schedule_id=schedule_id,
        )
        # An UPDATE's result is a CursorResult (it has the rowcount); Session.execute is typed for any statement.
        claimed = cast(
            CursorResult[Any],
            session.execute(
                update(PoolNode)
                .where(col(PoolNode.name) == node.name, col(PoolNode.worker_id).is_(None))
                .values(worker_id=worker.id)
            ),
        )
        if claimed.rowcount != 1:
            continue  # taken meanwhile by a concurrent start
        session.add(worker)
        session.flush()
        events.record(
            session,
            model,
            EventKind.WORKER_STARTED,
            f"worker {worker.id} pending on {node.name} "
            f"(profile {node.profile}{', standby' if standby else ''}, by {started_by})",
            worker_id=worker.id,
        )
        workers.append(worker)
        if len(workers) == count:
            return workers
    raise NoFreeNode(why_no_node(session, model, heartbeat_s, profile, count, len(workers)))  # rolled back: none


def start_worker(session: Session, account: Account, model_name: str, heartbeat_s: float, profile: str | None = None) -> Worker:
    """One worker (see :func:`start_workers`)."""
    return start_workers(session, account, model_name, heartbeat_s, profile=profile)[0]


def free_nodes(session: Session, model: Model, heartbeat_s: float, profile: str | None = None) -> list[PoolNode]:
    """Live, unbound, dedicated nodes that may serve the model: its class, its labels, the profile."""
    query = select(PoolNode).where(
        live(heartbeat_s),
        col(PoolNode.worker_id).is_(None),
        PoolNode.host_class == model.hardware,
        col(PoolNode.shared).is_(False),
    )
    if profile is not None:
        query = query.where(PoolNode.profile == profile)
    selector, required = model_selector(model), required_backends(session, model)
    return [
        n for n in session.exec(query.order_by(PoolNode.name)) if labels_match(node_labels(n), selector) and can_run(n, required)
    ]


def why_no_node(session: Session, model: Model, heartbeat_s: float, profile: str | None, count: int, free: int) -> str:
    """A refusal that says which condition no node met, and what to do."""
    nodes = list(session.exec(select(PoolNode).where(live(heartbeat_s), col(PoolNode.shared).is_(False))))
    selector = model_selector(model)
    of_class = [n for n in nodes if n.host_class == model.hardware]
    labelled = [n for n in of_class if labels_match(node_labels(n), selector)]
    profiled = [n for n in labelled if profile is None or n.profile == profile]
    required = required_backends(session, model)
    built = [n for n in profiled if can_run(n, required)]
    start = "start one (`cipherpool pool node --profile NAME`)"
    if not of_class:
        others = sorted({n.host_class for n in nodes})
        return (
            f"No {model.hardware} pool node is online for model {model.name!r}"
            f"{' (only ' + ', '.join(others) + ' nodes are)' if others else ''}: {start}."
        )
    if not labelled:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return f"No online {model.hardware} node carries the labels {wanted} that model {model.name!r} asks for: {start}."
    if not profiled:
        return f"No online {model.hardware} node of profile {profile!r} may serve model {model.name!r}: {start}."
    if not built:
        backend = backends.describe(min(required - frozenset.intersection(*(capabilities_of(n) for n in profiled))))
        return (
            f"Model {model.name!r} was compiled for {backend.target} and none of the {len(profiled)} online "
            f"{model.hardware} node(s) that may serve it has {backend.needs} (`cipherpool pool nodes` shows which "
            f"do): {backend.remedy}."
        )
    return (
        f"{count} worker(s) asked for model {model.name!r}, but only {free} of the {len(built)} {model.hardware} "
        f"node(s) that may serve it are free (the others serve workers): stop a worker, or {start}."
    )


def node_labels(node: PoolNode) -> dict[str, str]:
    labels = json.loads(node.labels or "{}")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def get_worker(session: Session, account: Account, worker_id: str) -> Worker:
    worker = session.get(Worker, worker_id)
    if worker is None or worker.account_id != account.id:
        raise WorkerNotFound(f"No worker {worker_id!r} in this account.")
    return worker


@dataclass(frozen=True)
class StopDecision:
    """What stopping a worker needs: its row, and whether its node must be told to unbind."""

    worker: Worker
    tell_node: bool


def request_stop(
    session: Session, account: Account, worker_id: str, heartbeat_s: float, reason: StopReason | str = StopReason.USER
) -> StopDecision:
    """Mark a worker STOPPING; the node unbinds it (queries in flight finish). A worker whose
    node is offline or silent is STOPPED at once: the node finds it stopped when it comes back.
    ``reason`` says who or what stopped it. A user may not take an active model below its
    ``min_workers`` (the reconciler would start another at once)."""
    worker = get_worker(session, account, worker_id)
    if not worker.status.wanted:
        return StopDecision(worker, tell_node=False)
    reason = StopReason(reason)
    model = session.get(Model, worker.model_id)
    if reason == StopReason.USER and model is not None and model.status == ModelStatus.ACTIVE:
        left = len(serving(session, model_id=model.id)) - 1
        if left < model.min_workers:
            raise BelowMinimum(
                f"Model {model.name!r} keeps at least {model.min_workers} worker(s) (min_workers): lower "
                f"it first (`cipherpool model update {model.name} --min-workers {max(0, left)}`), or "
                f"deactivate the model."
            )
    worker.stop_reason = reason.value
    if not node_is_live(session, worker.node_name, heartbeat_s):
        # A silent node's worker owes nothing past the node's last heartbeat (as when it is lost).
        node = session.get(PoolNode, worker.node_name)
        error = f"node {worker.node_name} was not live"
        if node is not None and node.last_seen is not None:
            finish_silent(session, worker.id, WorkerStatus.STOPPED, aware(node.last_seen), error=error)
        else:
            finish(session, worker.id, WorkerStatus.STOPPED, error=error)
        return StopDecision(worker, tell_node=False)
    settle(session, worker.id)  # up to now at its state's rate (standby's, if it was): stopping is runtime
    worker.status = WorkerStatus.STOPPING
    session.add(worker)
    return StopDecision(worker, tell_node=True)


def request_standby(session: Session, account: Account, worker_id: str, standby: bool) -> Worker:
    """Ask for a worker to be kept loaded without consuming (``standby``) or to consume again;
    its node makes it so (:func:`cipherpool.workers.binding.apply_standby`)."""
    worker = get_worker(session, account, worker_id)
    if not worker.status.wanted or worker.status == WorkerStatus.STOPPING:
        raise WrongWorkerState(
            f"Worker {worker.id} is {worker.status.value}: only a pending, loading, up or standby "
            f"worker can be put on standby or resumed."
        )
    worker.standby = standby
    session.add(worker)
    return worker


def serving(session: Session, *, account_id: str | None = None, model_id: str | None = None) -> list[Worker]:
    """Workers starting or running, of an account or of one model."""
    query = select(Worker).where(col(Worker.status).in_(WANTED))
    if account_id is not None:
        query = query.where(Worker.account_id == account_id)
    if model_id is not None:
        query = query.where(Worker.model_id == model_id)
    return list(session.exec(query.order_by(col(Worker.created_at))))


def binding_to_load(session: Session, worker_id: str, node_name: str) -> tuple[Worker, Model] | None:
    """The worker a node was asked to bind, and its model, if the node should load it now.

    None when the binding is already over (stopped or failed meanwhile: a stale message);
    WorkerStartFailed when it does not belong to this node."""
    worker = session.get(Worker, worker_id)
    model = session.get(Model, worker.model_id) if worker else None
    if worker is None or model is None or worker.node_name != node_name:
        raise WorkerStartFailed(f"No binding {worker_id!r} for node {node_name}.")
    if not worker.status.wanted:
        return None
    return worker, model


def mark_loading(session: Session, worker_id: str) -> None:
    """The node has begun loading the worker's model."""
    worker = session.get(Worker, worker_id)
    if worker is not None and worker.status == WorkerStatus.PENDING:
        worker.status = WorkerStatus.LOADING
        session.add(worker)


def mark_running(session: Session, worker_id: str, versions: set[int] | None = None) -> None:
    """The node holds the worker's model, ``versions`` of it, loaded; it may complete a rollout.
    Whether it is UP or on STANDBY is :func:`set_consuming`'s business."""
    worker = session.get(Worker, worker_id)
    if worker is None or worker.status not in (WorkerStatus.PENDING, WorkerStatus.LOADING):
        return
    worker.started_at = utcnow()
    model = session.get(Model, worker.model_id)
    if versions and model is not None:
        preferred = [v for v in (model.rollout_version, model.version) if v in versions]
        worker.version = preferred[0] if preferred else max(versions)
    session.add(worker)
    if model is not None:
        rollout.complete_if_held(session, model)


def set_consuming(session: Session, worker_id: str, consuming: bool) -> None:
    """The node consumes the worker's queue (UP) or not (STANDBY): the status and the event."""
    worker = session.get(Worker, worker_id)
    if worker is None or not worker.status.wanted:
        return
    status = WorkerStatus.UP if consuming else WorkerStatus.STANDBY
    if worker.status == status:
        return
    first = worker.status in (WorkerStatus.PENDING, WorkerStatus.LOADING)
    settle(session, worker.id)  # the time so far at the rate of the state it leaves
    worker.status = status
    session.add(worker)
    if first:
        held = f" (version {worker.version})" if worker.version else ""
        kind, what = (EventKind.WORKER_UP, "up") if consuming else (EventKind.WORKER_STANDBY, "loaded, on standby")
    else:
        kind, what = (EventKind.WORKER_RESUMED, "resumed") if consuming else (EventKind.WORKER_STANDBY, "on standby")
        held = ""
    events.record_for(
        session,
        worker.model_id,
        kind,
        f"worker {worker.id} {what} on {worker.node_name}{held}",
        worker_id=worker.id,
        version=worker.version,
    )


def finish_silent(
    session: Session, worker_id: str, status: WorkerStatus, heard: datetime, *, error: str, now: datetime | None = None
) -> None:
    """End a worker whose node went silent after ``heard`` (its last heartbeat): charged exactly
    up to it, anything charged past it given back once, nothing owed after."""
    skip_silence(session, worker_id, heard, now or utcnow())
    finish(session, worker_id, status, error=error, charge_until=heard)


def finish(
    session: Session, worker_id: str, status: WorkerStatus, error: str | None = None, *, charge_until: datetime | None = None
) -> None:
    """End a binding (STOPPED or FAILED) and free its node; the event says why. What the
    worker owes is charged now, up to its stop, or up to ``charge_until`` (a lost node's last
    heartbeat: the silence after it is not charged)."""
    worker = lock_worker(session, worker_id)  # read fresh, after any concurrent finish of it
    if worker is None:
        return
    if worker.status in (WorkerStatus.STOPPED, WorkerStatus.FAILED):  # ended already: its stop and charge stand
        session.execute(update(PoolNode).where(col(PoolNode.worker_id) == worker_id).values(worker_id=None))
        return
    now = utcnow()
    settle(session, worker.id, min(charge_until, now) if charge_until is not None else now)
    if charge_until is not None and worker.started_at is not None:
        worker.billed_to = now  # settled: the time after charge_until is not owed
    worker.status, worker.error, worker.stopped_at = status, error, now
    if status == WorkerStatus.FAILED and worker.stop_reason is None:
        worker.stop_reason = StopReason.FAILURE.value
    session.add(worker)
    session.execute(update(PoolNode).where(col(PoolNode.worker_id) == worker_id).values(worker_id=None))
    model = session.get(Model, worker.model_id)
    if model is not None:
        rollout.complete_if_held(session, model)  # it may have been the last worker without the new version
    if status == WorkerStatus.FAILED:
        events.record_for(
            session,
            worker.model_id,
            EventKind.WORKER_FAILED,
            f"worker {worker.id} on {worker.node_name} failed: {error}",
            worker_id=worker.id,
        )
    else:
        why = worker.stop_reason or StopReason.USER.value
        events.record_for(
            session,
            worker.model_id,
            EventKind.WORKER_STOPPED,
            f"worker {worker.id} on {worker.node_name} stopped ({why}{': ' + error if error else ''})",
            worker_id=worker.id,
        )


def running_count(session: Session, model_id: str) -> int:
    """Workers of the model that serve from a node seen online."""
    return len(
        session.exec(
            select(Worker.id)
            .join(PoolNode, col(PoolNode.name) == Worker.node_name)
            .where(
                Worker.model_id == model_id,
                Worker.status == WorkerStatus.UP,
                PoolNode.status == NodeStatus.ONLINE,
            )
        ).all()
    )


def list_workers(session: Session, account: Account, model_name: str | None = None) -> list[Worker]:
    query = select(Worker).where(Worker.account_id == account.id)
    if model_name:
        query = query.where(Worker.model_id == get_model(session, account, model_name).id)
    return list(session.exec(query.order_by(col(Worker.created_at))))


def describe(session: Session, worker: Worker) -> WorkerOut:
    model = session.get(Model, worker.model_id)
    node = session.get(PoolNode, worker.node_name)
    return WorkerOut(
        id=worker.id,
        model=model.name if model else None,
        node=worker.node_name,
        node_status=node.status.value if node else None,
        status=worker.status,
        profile=node.profile if node else None,
        standby=worker.standby,
        version=worker.version,
        error=worker.error,
        stop_reason=worker.stop_reason,
        started_by=worker.started_by,
        schedule_id=worker.schedule_id,
        created_at=worker.created_at.isoformat(),
        started_at=worker.started_at.isoformat() if worker.started_at else None,
        stopped_at=worker.stopped_at.isoformat() if worker.stopped_at else None,
    )
