"""Starting, stopping, standing by and replacing workers, and rolling versions out: the
service's decision, committed, then the nodes' messages.

Called by the gateway for a provider, by an operator's commands and by beat's jobs
(:mod:`cipherpool.scheduler`: schedules, credits, autoscaling, the reconciler), so every path
makes the same checks
(:mod:`cipherpool.services.workers`). The row is committed before the node hears of it,
because the node reads its binding from the database. Each decision is also a line in the
worker's log (:mod:`cipherpool.workerlog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from sqlmodel import Session

from cipherpool import workerlog
from cipherpool.announce import serving_changed
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, Worker, WorkerStatus
from cipherpool.dispatch import send_to_node
from cipherpool.errors import CipherpoolError
from cipherpool.names import BIND_TASK, CONSUME_TASK, RELOAD_TASK, UNBIND_TASK
from cipherpool.services import workers as worker_service
from cipherpool.services.accounts import get_account
from cipherpool.statuses import StopReason

log = logging.getLogger("cipherpool.lifecycle")


def start_workers(
    ctx: PlatformContext,
    app: Celery,
    account_id: str,
    model: str,
    *,
    count: int = 1,
    profile: str | None = None,
    standby: bool = False,
    source: str = "gateway",
    started_by: str = "user",
    schedule_id: str | None = None,
    why: Callable[[Session, Worker], None] | None = None,
) -> list[Worker]:
    """Claim ``count`` free nodes of the model's class (labels, profile) and tell each to bind
    (status PENDING); refused with the reason, all or none. ``started_by`` (user, schedule,
    autoscaler, reconciler) and ``schedule_id`` are kept on the worker: a schedule stops its
    own workers, and the autoscaler removes its own first. ``why`` records the caller's reason
    for each worker in the claim's own transaction, so whoever sees the worker sees the reason
    too (a reason written afterwards is missing for a moment, or for good after a crash)."""
    with ctx.session() as session:
        account = get_account(session, account_id)
        workers = worker_service.start_workers(
            session,
            account,
            model,
            ctx.settings.node_heartbeat_s,
            count=count,
            profile=profile,
            standby=standby,
            credit_minutes=ctx.settings.credits_min_start_minutes,
            started_by=started_by,
            schedule_id=schedule_id,
        )
        if why is not None:
            for worker in workers:
                why(session, worker)
    for i, worker in enumerate(workers):
        workerlog.write(
            ctx.store.redis,
            worker.id,
            f"pending: claimed node {worker.node_name} for model {model}{' (standby)' if standby else ''}",
            source=source,
        )
        try:
            send_to_node(app, worker.node_name, BIND_TASK, worker_id=worker.id)
        except CipherpoolError as exc:  # none left pending forever, holding its node
            with ctx.session() as session:
                for unsent in workers[i:]:
                    worker_service.finish(
                        session, unsent.id, WorkerStatus.FAILED, error=f"its node could not be told to bind: {exc.message}"
                    )
            raise
    return workers


def start_worker(ctx: PlatformContext, app: Celery, account_id: str, model: str, profile: str | None = None) -> Worker:
    """One worker (see :func:`start_workers`)."""
    return start_workers(ctx, app, account_id, model, profile=profile)[0]


def stop_worker(
    ctx: PlatformContext,
    app: Celery,
    account_id: str,
    worker_id: str,
    reason: StopReason | str = StopReason.USER,
    source: str = "gateway",
) -> Worker:
    """Ask the worker's node to unbind it, or release it at once if the node is gone."""
    reason = StopReason(reason)
    with ctx.session() as session:
        account = session.get(Account, account_id)
        if account is None or reason == StopReason.USER:
            account = get_account(session, account_id)  # a provider's request: its account must be enabled
        decision = worker_service.request_stop(session, account, worker_id, ctx.settings.node_heartbeat_s, reason)
    workerlog.write(ctx.store.redis, worker_id, f"stop requested ({reason.value})", source=source)
    if decision.tell_node:
        send_to_node(app, decision.worker.node_name, UNBIND_TASK, worker_id=decision.worker.id)
    else:
        serving_changed(ctx)
    return decision.worker


def set_standby(ctx: PlatformContext, app: Celery, account_id: str, worker_id: str, standby: bool) -> Worker:
    """Keep a worker loaded without consuming (``standby``), or resume it: instant either way,
    the model stays in memory. The node makes its consumption match the row."""
    with ctx.session() as session:
        worker = worker_service.request_standby(session, get_account(session, account_id), worker_id, standby)
    workerlog.write(ctx.store.redis, worker_id, "standby requested" if standby else "resume requested")
    send_to_node(app, worker.node_name, CONSUME_TASK, worker_id=worker.id)
    return worker


def stop_account_workers(
    ctx: PlatformContext, app: Celery, account_id: str, reason: StopReason | str = StopReason.ACCOUNT_DISABLED
) -> list[str]:
    """Stop every worker of an account (it was disabled, or ran out of credits)."""
    with ctx.session() as session:
        ids = [w.id for w in worker_service.serving(session, account_id=account_id)]
    for worker_id in ids:
        stop_worker(ctx, app, account_id, worker_id, reason, source="platform")
    return ids


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
