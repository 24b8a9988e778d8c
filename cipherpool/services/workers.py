"""Pool nodes and the workers (model bindings) that occupy them.

A node is free when it is online, was seen recently and no binding holds it. A binding claims
its node with a conditional UPDATE, so two concurrent starts never get the same node.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, select

from cipherpool.db.tables import Account, Model, NodeStatus, PoolNode, Worker, WorkerStatus, utcnow
from cipherpool.errors import NoFreeNode, WorkerNotFound
from cipherpool.services.models import get_model

NODE_STALE_HEARTBEATS = 3  # a node unseen for this many heartbeats is not offered


def register_node(
    session: Session, name: str, *, host_class: str, concurrency: int, threads: int | None, pid: int
) -> PoolNode:
    node = session.get(PoolNode, name) or PoolNode(name=name)
    node.host_class, node.concurrency, node.threads, node.pid = host_class, concurrency, threads, pid
    node.status = NodeStatus.ONLINE
    node.started_at = node.last_seen = utcnow()
    session.add(node)
    return node


def heartbeat(session: Session, name: str) -> None:
    session.execute(update(PoolNode).where(PoolNode.name == name).values(last_seen=utcnow(), status=NodeStatus.ONLINE))


def node_offline(session: Session, name: str) -> None:
    session.execute(update(PoolNode).where(PoolNode.name == name).values(status=NodeStatus.OFFLINE))


def _live(heartbeat_s: float):
    """SQL condition: the node says it is online and was heard from recently."""
    fresh = utcnow() - timedelta(seconds=heartbeat_s * NODE_STALE_HEARTBEATS)
    return (PoolNode.status == NodeStatus.ONLINE) & (PoolNode.last_seen >= fresh)


def node_is_live(session: Session, name: str, heartbeat_s: float) -> bool:
    return session.exec(select(PoolNode.name).where(PoolNode.name == name, _live(heartbeat_s))).first() is not None


def start_worker(session: Session, account: Account, model_name: str, heartbeat_s: float) -> Worker:
    """Claim a free node of the model's host class for a new binding (status STARTING)."""
    model = get_model(session, account, model_name)
    candidates = session.exec(
        select(PoolNode)
        .where(_live(heartbeat_s), PoolNode.worker_id.is_(None), PoolNode.host_class == model.hardware)
        .order_by(PoolNode.name)
    ).all()
    for node in candidates:
        worker = Worker(account_id=account.id, model_id=model.id, node_name=node.name)
        claimed = session.execute(
            update(PoolNode).where(PoolNode.name == node.name, PoolNode.worker_id.is_(None)).values(worker_id=worker.id)
        )
        if claimed.rowcount == 1:
            session.add(worker)
            session.flush()
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


def request_stop(session: Session, account: Account, worker_id: str) -> Worker:
    worker = get_worker(session, account, worker_id)
    if worker.status in (WorkerStatus.STARTING, WorkerStatus.RUNNING):
        worker.status = WorkerStatus.STOPPING
        session.add(worker)
    return worker


def mark_running(session: Session, worker_id: str) -> None:
    worker = session.get(Worker, worker_id)
    if worker is not None and worker.status == WorkerStatus.STARTING:
        worker.status, worker.started_at = WorkerStatus.RUNNING, utcnow()
        session.add(worker)


def finish(session: Session, worker_id: str, status: WorkerStatus, error: str | None = None) -> None:
    """End a binding (STOPPED or FAILED) and free its node."""
    worker = session.get(Worker, worker_id)
    if worker is None:
        return
    worker.status, worker.error, worker.stopped_at = status, error, utcnow()
    session.add(worker)
    session.execute(update(PoolNode).where(PoolNode.worker_id == worker_id).values(worker_id=None))


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


def running_count(session: Session, model_id: str) -> int:
    """Workers of the model that serve from a node seen online."""
    return len(session.exec(
        select(Worker.id).join(PoolNode, PoolNode.name == Worker.node_name).where(
            Worker.model_id == model_id, Worker.status == WorkerStatus.RUNNING, PoolNode.status == NodeStatus.ONLINE,
        )
    ).all())


def list_workers(session: Session, account: Account, model_name: str | None = None) -> list[Worker]:
    query = select(Worker).where(Worker.account_id == account.id)
    if model_name:
        query = query.where(Worker.model_id == get_model(session, account, model_name).id)
    return list(session.exec(query.order_by(Worker.created_at)))


def describe(session: Session, worker: Worker) -> dict:
    model = session.get(Model, worker.model_id)
    node = session.get(PoolNode, worker.node_name)
    return {
        "id": worker.id,
        "model": model.name if model else None,
        "node": worker.node_name,
        "node_status": node.status.value if node else None,
        "status": worker.status.value,
        "error": worker.error,
        "created_at": worker.created_at.isoformat(),
        "started_at": worker.started_at.isoformat() if worker.started_at else None,
        "stopped_at": worker.stopped_at.isoformat() if worker.stopped_at else None,
    }
