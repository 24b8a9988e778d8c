"""What should run against what runs: workers whose pool node went silent.

A node heartbeats every ``node_heartbeat_s``; one not heard from for 3 beats is lost (a
SIGKILL, a host gone). Its workers are failed with the reason and its node marked offline, so
the model's queries can be served elsewhere; :func:`cipherpool.scheduler.reconcile.reconcile` then
starts replacements where the model still wants them, started as the lost one was (by whom,
for which schedule, of which profile), so a schedule still stops it at its window's end. A
node that comes back finds its worker failed and stays free (it rebinds only a worker still
wanted).

A lost worker is charged up to its node's last heartbeat and no further: what a stop or an
older tick charged past it is given back (:func:`cipherpool.billing.charging.skip_silence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from cipherpool.billing.charging import lock_worker
from cipherpool.clock import aware, utcnow
from cipherpool.db.tables import Account, Model, ModelStatus, NodeStatus, PoolNode, Worker, WorkerStatus
from cipherpool.services.nodes import NODE_STALE_HEARTBEATS
from cipherpool.services.workers import finish_silent
from cipherpool.statuses import HOLDING_NODE, StopReason


@dataclass(frozen=True)
class Lost:
    """A worker failed because its node was lost; ``replace``: the model still wants one. How
    it was started (``started_by``, ``schedule_id``, ``profile``, ``standby``) is what its
    replacement is started with: a schedule's worker stays the schedule's."""

    worker_id: str
    account_id: str
    model_name: str
    node: str
    replace: bool
    started_by: str = "user"
    schedule_id: str | None = None
    profile: str | None = None
    standby: bool = False


def fail_lost_workers(session: Session, heartbeat_s: float, now: datetime | None = None) -> list[Lost]:
    """Fail every worker whose node has been silent for 3 heartbeats (at ``now``), charged up
    to the node's last heartbeat only. A node that shut down cleanly (offline) and restarts
    within that time rebinds its worker instead."""
    now = aware(now or utcnow())
    stale = now - timedelta(seconds=heartbeat_s * NODE_STALE_HEARTBEATS)
    rows = session.exec(
        select(Worker, PoolNode)
        .join(PoolNode, col(PoolNode.name) == Worker.node_name)
        .where(col(Worker.status).in_(HOLDING_NODE), col(PoolNode.last_seen) < stale)
    ).all()
    lost = []
    for found, node in rows:
        # Locked and read again: a second beat's reconciler that failed it first (committed
        # while this one waited) has replaced it already; this one must not replace it again.
        worker = lock_worker(session, found.id)
        if worker is None or worker.status not in HOLDING_NODE:
            continue
        # Read again too: a node that registered again (committed while this one waited for the
        # worker's lock) is not lost, and its fresh row must not be marked offline.
        node = session.exec(select(PoolNode).where(PoolNode.name == node.name).execution_options(populate_existing=True)).one()
        if aware(node.last_seen) >= stale:
            continue
        silent = (now - aware(node.last_seen)).total_seconds()
        wanted = worker.status != WorkerStatus.STOPPING
        node.status = NodeStatus.OFFLINE
        session.add(node)
        worker.stop_reason = StopReason.NODE_LOST.value
        finish_silent(
            session,
            worker.id,
            WorkerStatus.FAILED,
            aware(node.last_seen),
            now=now,
            error=f"node {node.name} lost: no heartbeat for {silent:.0f} s",
        )
        lost.append(_lost(session, worker, node.name, wanted))
    return lost


def _lost(session: Session, worker: Worker, node: str, wanted: bool) -> Lost:
    """What the lifecycle needs to replace the worker as it was started, if its model still wants it."""
    model = session.get(Model, worker.model_id)
    account = session.get(Account, worker.account_id)
    replace = (
        wanted
        and model is not None
        and model.status == ModelStatus.ACTIVE
        and account is not None
        and account.disabled_at is None
    )
    return Lost(
        worker.id,
        worker.account_id,
        model.name if model else "?",
        node,
        replace,
        started_by=worker.started_by,
        schedule_id=worker.schedule_id,
        profile=worker.profile,
        standby=worker.standby,
    )
