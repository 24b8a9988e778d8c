"""Starting and stopping workers: the service's decision, committed, then the node's message.

Called by the gateway for a provider and by beat jobs (schedules, credits, autoscaling), so
every path makes the same checks (:mod:`cipherpool.services.workers`). The row is committed
before the node hears of it, because the node reads its binding from the database.
"""

from __future__ import annotations

from celery import Celery

from cipherpool.db.tables import Worker
from cipherpool.dispatch import send_to_node
from cipherpool.names import BIND_TASK, UNBIND_TASK
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
    """Ask the worker's node to unbind it, or release it at once if the node is gone."""
    with ctx.session() as session:
        account = get_account(session, account_id)
        decision = worker_service.request_stop(session, account, worker_id, ctx.settings.node_heartbeat_s)
    if decision.tell_node:
        send_to_node(app, decision.worker.node_name, UNBIND_TASK, worker_id=decision.worker.id)
    return decision.worker
