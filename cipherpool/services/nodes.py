"""Pool nodes: registration, heartbeats and liveness.

A pool node is a persistent ``celery worker`` process that registers itself when ready,
heartbeats while it runs and is marked offline when it stops. Which model it serves is the
worker (binding) lifecycle's business (:mod:`cipherpool.services.workers`); this module only
answers "which nodes exist, and which are alive?".
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, update
from sqlmodel import Session, col, select

from cipherpool.db.tables import Model, NodeStatus, PoolNode, Worker, WorkerStatus, utcnow

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
    session.execute(update(PoolNode).where(col(PoolNode.name) == name).values(last_seen=utcnow(), status=NodeStatus.ONLINE))


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
    return worker is not None and worker.status in (WorkerStatus.STARTING, WorkerStatus.RUNNING)
