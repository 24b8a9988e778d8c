"""Starting and stopping workers and rolling versions out: the service's decision,
committed, then the nodes' messages.

Called by the gateway for a provider, by an operator's commands and by beat jobs (schedules,
credits, autoscaling), so every path makes the same checks (:mod:`cipherpool.services.workers`).
The row is committed before the node hears of it, because the node reads its binding from
the database.
"""

from __future__ import annotations

import logging

from celery import Celery

from cipherpool.db.tables import Worker
from cipherpool.dispatch import send_to_node
from cipherpool.errors import CipherpoolError
from cipherpool.names import BIND_TASK, RELOAD_TASK, UNBIND_TASK
from cipherpool.services import workers as worker_service
from sqlmodel import Session

from cipherpool.db.tables import Account
from cipherpool.services import events
from cipherpool.services.reconcile import Lost, fail_lost_workers
from cipherpool.statuses import EventKind
from cipherpool.services.accounts import get_account
from cipherpool.workers.context import PlatformContext

log = logging.getLogger("cipherpool.lifecycle")


def start_worker(ctx: PlatformContext, app: Celery, account_id: str, model: str) -> Worker:
    """Claim a free node of the model's class and tell it to bind (status STARTING)."""
    with ctx.session() as session:
        account = get_account(session, account_id)
        worker = worker_service.start_worker(session, account, model, ctx.settings.node_heartbeat_s)
    send_to_node(app, worker.node_name, BIND_TASK, worker_id=worker.id)
    return worker


def stop_worker(ctx: PlatformContext, app: Celery, account_id: str, worker_id: str, reason: str = "user") -> Worker:
    """Ask the worker's node to unbind it, or release it at once if the node is gone."""
    with ctx.session() as session:
        account = session.get(Account, account_id)
        if account is None or reason == "user":
            account = get_account(session, account_id)  # a provider's request: its account must be enabled
        decision = worker_service.request_stop(session, account, worker_id, ctx.settings.node_heartbeat_s, reason)
    if decision.tell_node:
        send_to_node(app, decision.worker.node_name, UNBIND_TASK, worker_id=decision.worker.id)
    return decision.worker


def stop_account_workers(ctx: PlatformContext, app: Celery, account_id: str, reason: str) -> list[str]:
    """Stop every worker of an account (it was disabled); the ids of those asked to stop."""
    with ctx.session() as session:
        ids = [w.id for w in worker_service.serving(session, account_id=account_id)]
    for worker_id in ids:
        stop_worker(ctx, app, account_id, worker_id, reason)
    return ids


def reconcile(ctx: PlatformContext, app: Celery) -> list[Lost]:
    """Beat's job: fail the workers of lost nodes (committed first), then start a replacement
    on a free node of the class for each that its model still wants."""
    with ctx.session() as session:
        lost = fail_lost_workers(session, ctx.settings.node_heartbeat_s)
    for worker in lost:
        log.warning("worker %s of %s failed: node %s lost", worker.worker_id, worker.model_name, worker.node)
        if not worker.replace:
            continue
        try:
            replacement = start_worker(ctx, app, worker.account_id, worker.model_name)
            log.info("worker %s replaces %s on %s", replacement.id, worker.worker_id, replacement.node_name)
        except CipherpoolError as exc:
            log.warning("no replacement for worker %s: %s", worker.worker_id, exc.message)
            with ctx.session() as session:
                events.record_for(session, _model_id(session, worker.worker_id), EventKind.WORKER_FAILED,
                                  f"no replacement for worker {worker.worker_id}: {exc.message}", worker_id=worker.worker_id)
    return lost


def _model_id(session: Session, worker_id: str) -> str:
    worker = session.get(Worker, worker_id)
    return worker.model_id if worker else ""


def roll_out(ctx: PlatformContext, app: Celery, model_id: str) -> None:
    """Tell every node serving the model to load the versions it must hold now (they take
    turns: a lock per model). A node that misses the message catches up when it next binds."""
    with ctx.session() as session:
        workers = worker_service.serving(session, model_id=model_id)
    for worker in workers:
        try:
            send_to_node(app, worker.node_name, RELOAD_TASK, worker_id=worker.id)
        except CipherpoolError as exc:
            log.warning("could not tell %s to reload: %s", worker.node_name, exc)
