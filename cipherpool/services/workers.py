"""Workers: a model's serving units, each bound to one pool node while it runs.

The decisions about a worker live here, as plain functions over a session, so the gateway (for
a provider), beat jobs (schedules, credits, autoscaling) and the node itself make the same
checks. A binding claims its node with a conditional UPDATE, so two concurrent starts never
get the same node. Node registration and liveness are :mod:`cipherpool.services.nodes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlmodel import Session, col, select

from cipherpool.api.schemas import WorkerOut
from cipherpool.db.tables import Account, Model, NodeStatus, PoolNode, Worker, WorkerStatus, utcnow
from cipherpool.errors import NoFreeNode, WorkerNotFound, WorkerStartFailed
from cipherpool.services import events, rollout
from cipherpool.services.models import get_model
from cipherpool.services.nodes import live, node_is_live
from cipherpool.statuses import EventKind


def start_worker(session: Session, account: Account, model_name: str, heartbeat_s: float) -> Worker:
    """Claim a free node of the model's host class for a new binding (status STARTING)."""
    model = get_model(session, account, model_name)
    candidates = session.exec(
        select(PoolNode)
        .where(live(heartbeat_s), col(PoolNode.worker_id).is_(None), PoolNode.host_class == model.hardware)
        .order_by(PoolNode.name)
    ).all()
    for node in candidates:
        worker = Worker(account_id=account.id, model_id=model.id, node_name=node.name)
        # An UPDATE's result is a CursorResult (it has the rowcount); Session.execute is typed for any statement.
        claimed = cast(CursorResult[Any], session.execute(
            update(PoolNode).where(col(PoolNode.name) == node.name, col(PoolNode.worker_id).is_(None)).values(worker_id=worker.id)
        ))
        if claimed.rowcount == 1:
            session.add(worker)
            session.flush()
            events.record(session, model, EventKind.WORKER_STARTED, f"worker {worker.id} starting on {node.name}",
                          worker_id=worker.id)
            return worker
    raise NoFreeNode(
        f"No free {model.hardware} pool node: every node is bound or offline. Stop a worker "
        f"or start another node (`celery -A cipherpool.tasks worker -Q cipherpool.pool ...`)."
    )


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


def request_stop(session: Session, account: Account, worker_id: str, heartbeat_s: float,
                 reason: str = "user") -> StopDecision:
    """Mark a worker STOPPING; the node unbinds it (queries in flight finish). A worker whose
    node is offline or silent is STOPPED at once: the node finds it stopped when it comes back.
    ``reason`` says who or what stopped it (user, account disabled, ...)."""
    worker = get_worker(session, account, worker_id)
    if worker.status not in (WorkerStatus.STARTING, WorkerStatus.RUNNING):
        return StopDecision(worker, tell_node=False)
    worker.stop_reason = reason
    if not node_is_live(session, worker.node_name, heartbeat_s):
        finish(session, worker.id, WorkerStatus.STOPPED, error=f"node {worker.node_name} was not live")
        return StopDecision(worker, tell_node=False)
    worker.status = WorkerStatus.STOPPING
    session.add(worker)
    return StopDecision(worker, tell_node=True)


def serving(session: Session, *, account_id: str | None = None, model_id: str | None = None) -> list[Worker]:
    """Workers starting or running, of an account or of one model."""
    query = select(Worker).where(col(Worker.status).in_((WorkerStatus.STARTING, WorkerStatus.RUNNING)))
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
    if worker.status not in (WorkerStatus.STARTING, WorkerStatus.RUNNING):
        return None
    return worker, model


def mark_running(session: Session, worker_id: str, versions: set[int] | None = None) -> None:
    """The node serves the worker now, holding model ``versions``; it may complete a rollout."""
    worker = session.get(Worker, worker_id)
    if worker is None or worker.status != WorkerStatus.STARTING:
        return
    worker.status, worker.started_at = WorkerStatus.RUNNING, utcnow()
    model = session.get(Model, worker.model_id)
    if versions and model is not None:
        preferred = [v for v in (model.rollout_version, model.version) if v in versions]
        worker.version = preferred[0] if preferred else max(versions)
    session.add(worker)
    held = f" (version {', '.join(map(str, sorted(versions)))})" if versions else ""
    events.record_for(session, worker.model_id, EventKind.WORKER_UP, f"worker {worker.id} up on {worker.node_name}"
                      + held, worker_id=worker.id, version=worker.version)
    if model is not None:
        rollout.complete_if_held(session, model)


def finish(session: Session, worker_id: str, status: WorkerStatus, error: str | None = None) -> None:
    """End a binding (STOPPED or FAILED) and free its node; the event says why."""
    worker = session.get(Worker, worker_id)
    if worker is None:
        return
    was = worker.status
    worker.status, worker.error, worker.stopped_at = status, error, utcnow()
    if status == WorkerStatus.FAILED and worker.stop_reason is None:
        worker.stop_reason = "failure"
    session.add(worker)
    session.execute(update(PoolNode).where(col(PoolNode.worker_id) == worker_id).values(worker_id=None))
    if was in (WorkerStatus.STOPPED, WorkerStatus.FAILED):
        return
    model = session.get(Model, worker.model_id)
    if model is not None:
        rollout.complete_if_held(session, model)  # it may have been the last worker without the new version
    if status == WorkerStatus.FAILED:
        events.record_for(session, worker.model_id, EventKind.WORKER_FAILED,
                          f"worker {worker.id} on {worker.node_name} failed: {error}", worker_id=worker.id)
    else:
        why = worker.stop_reason or "user"
        events.record_for(session, worker.model_id, EventKind.WORKER_STOPPED, f"worker {worker.id} on "
                          f"{worker.node_name} stopped ({why}{': ' + error if error else ''})", worker_id=worker.id)


def running_count(session: Session, model_id: str) -> int:
    """Workers of the model that serve from a node seen online."""
    return len(session.exec(
        select(Worker.id).join(PoolNode, col(PoolNode.name) == Worker.node_name).where(
            Worker.model_id == model_id, Worker.status == WorkerStatus.RUNNING, PoolNode.status == NodeStatus.ONLINE,
        )
    ).all())


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
        version=worker.version,
        error=worker.error,
        stop_reason=worker.stop_reason,
        created_at=worker.created_at.isoformat(),
        started_at=worker.started_at.isoformat() if worker.started_at else None,
        stopped_at=worker.stopped_at.isoformat() if worker.stopped_at else None,
    )
