"""Starting and stopping workers: the database decision, then the message to the node.

Called by the gateway for a provider, and by beat jobs later (schedules, credits,
autoscaling), so that every path makes the same checks. The database row is committed before
the node hears of it: the node reads its binding from there.
"""

from __future__ import annotations

from celery import Celery

from cipherpool.db.tables import Worker, WorkerStatus
from cipherpool.dispatch import BIND_TASK, UNBIND_TASK, send_to_node
from cipherpool.services import workers as worker_service
from cipherpool.services.accounts import get_account
from cipherpool.workers.context import PlatformContext


def start_worker(ctx: PlatformContext, app: Celery, account_id: str, model: str) -> Worker:
    """Claim a free node of the model's class and tell it to bind (status STARTING)."""
    with ctx.session() as session:
        account = get_account(session, account_id)
        worker = worker_service.start_worker(session, account, model, ctx.settings.node_heartbeat_s)
    send_to_node(app, worker.node_name, BIND_TASK, worker_id=worker.id)
    return worker


def stop_worker(ctx: PlatformContext, app: Celery, account_id: str, worker_id: str) -> Worker:
    """Ask the node to unbind (queries in flight finish); a node that is offline or silent is
    released at once (it finds the binding stopped when it comes back)."""
    with ctx.session() as session:
        worker = worker_service.request_stop(session, get_account(session, account_id), worker_id)
        node_gone = not worker_service.node_is_live(session, worker.node_name, ctx.settings.node_heartbeat_s)
        if worker.status == WorkerStatus.STOPPING and node_gone:
            worker_service.finish(session, worker.id, WorkerStatus.STOPPED)
            session.refresh(worker)
    if worker.status == WorkerStatus.STOPPING:
        send_to_node(app, worker.node_name, UNBIND_TASK, worker_id=worker.id)
    return worker
