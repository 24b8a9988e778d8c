"""Starting, stopping, standing by and replacing workers, and rolling versions out: the
service's decision, committed, then the nodes' messages.

Called by the gateway for a provider, by an operator's commands and by beat jobs (schedules,
credits, autoscaling, the reconciler), so every path makes the same checks
(:mod:`cipherpool.services.workers`). The row is committed before the node hears of it,
because the node reads its binding from the database. Each decision is also a line in the
worker's log (:mod:`cipherpool.workerlog`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import Celery
from sqlmodel import Session, col, select

from cipherpool import workerlog
from cipherpool.db.tables import Account, Model, ModelStatus, Worker, WorkerStatus, utcnow
from cipherpool.dispatch import send_to_node
from cipherpool.errors import CipherpoolError
from cipherpool.names import BIND_TASK, CONSUME_TASK, RELOAD_TASK, SERVING_GENERATION_KEY, UNBIND_TASK
from cipherpool.services import events
from cipherpool.services import workers as worker_service
from cipherpool.services.accounts import get_account
from cipherpool.services.reconcile import Lost, fail_lost_workers
from cipherpool.statuses import EventKind, StopReason
from cipherpool.workers.context import PlatformContext

log = logging.getLogger("cipherpool.lifecycle")
MIN_RETRY_S = 60.0  # after a worker of a model failed to load, beat waits this long before starting another for its minimum


def start_workers(ctx: PlatformContext, app: Celery, account_id: str, model: str, *, count: int = 1,
                  profile: str | None = None, standby: bool = False, source: str = "gateway",
                  started_by: str = "user", schedule_id: str | None = None) -> list[Worker]:
    """Claim ``count`` free nodes of the model's class (labels, profile) and tell each to bind
    (status PENDING); refused with the reason, all or none. ``started_by`` (user, schedule,
    autoscaler, reconciler) and ``schedule_id`` are kept on the worker: a schedule stops its
    own workers, and the autoscaler removes its own first."""
    with ctx.session() as session:
        account = get_account(session, account_id)
        workers = worker_service.start_workers(session, account, model, ctx.settings.node_heartbeat_s, count=count,
                                               profile=profile, standby=standby,
                                               credit_minutes=ctx.settings.credits_min_start_minutes,
                                               started_by=started_by, schedule_id=schedule_id)
    for i, worker in enumerate(workers):
        workerlog.write(ctx.store.redis, worker.id, f"pending: claimed node {worker.node_name} for model {model}"
                        f"{' (standby)' if standby else ''}", source=source)
        try:
            send_to_node(app, worker.node_name, BIND_TASK, worker_id=worker.id)
        except CipherpoolError as exc:  # none left pending forever, holding its node
            with ctx.session() as session:
                for unsent in workers[i:]:
                    worker_service.finish(session, unsent.id, WorkerStatus.FAILED,
                                          error=f"its node could not be told to bind: {exc.message}")
            raise
    return workers


def start_worker(ctx: PlatformContext, app: Celery, account_id: str, model: str, profile: str | None = None) -> Worker:
    """One worker (see :func:`start_workers`)."""
    return start_workers(ctx, app, account_id, model, profile=profile)[0]


def stop_worker(ctx: PlatformContext, app: Celery, account_id: str, worker_id: str,
                reason: StopReason | str = StopReason.USER, source: str = "gateway") -> Worker:
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
        announce(ctx)
    return decision.worker


def set_standby(ctx: PlatformContext, app: Celery, account_id: str, worker_id: str, standby: bool) -> Worker:
    """Keep a worker loaded without consuming (``standby``), or resume it: instant either way,
    the model stays in memory. The node makes its consumption match the row."""
    with ctx.session() as session:
        worker = worker_service.request_standby(session, get_account(session, account_id), worker_id, standby)
    workerlog.write(ctx.store.redis, worker_id, "standby requested" if standby else "resume requested")
    send_to_node(app, worker.node_name, CONSUME_TASK, worker_id=worker.id)
    return worker


def stop_account_workers(ctx: PlatformContext, app: Celery, account_id: str,
                         reason: StopReason | str = StopReason.ACCOUNT_DISABLED) -> list[str]:
    """Stop every worker of an account (it was disabled, or ran out of credits)."""
    with ctx.session() as session:
        ids = [w.id for w in worker_service.serving(session, account_id=account_id)]
    for worker_id in ids:
        stop_worker(ctx, app, account_id, worker_id, reason, source="platform")
    return ids


def announce(ctx: PlatformContext) -> None:
    """Tell every gateway that which models have a worker up changed: they drop what they
    cached of it (a query for a model with no worker up is refused at submit), and keep their
    cached credentials: a worker's start or stop changes no credential."""
    try:
        ctx.store.redis.incr(SERVING_GENERATION_KEY)
    except Exception:  # noqa: BLE001 - gateways catch up within their cache TTL anyway
        log.warning("could not announce a worker change to the gateways")


def reconcile(ctx: PlatformContext, app: Celery) -> list[Lost]:
    """Beat's job: fail the workers of lost nodes (committed first) and start a replacement on
    a free node of the class for each that its model still wants; then bring every active
    model up to its ``min_workers``."""
    with ctx.session() as session:
        lost = fail_lost_workers(session, ctx.settings.node_heartbeat_s)
    for worker in lost:
        log.warning("worker %s of %s failed: node %s lost", worker.worker_id, worker.model_name, worker.node)
        workerlog.write(ctx.store.redis, worker.worker_id, f"failed: node {worker.node} lost (no heartbeat)",
                        level="error", source="beat")
        if worker.replace:
            _replace(ctx, app, worker)
    if lost:
        announce(ctx)
    keep_minimum(ctx, app)
    return lost


def _replace(ctx: PlatformContext, app: Celery, worker: Lost) -> None:
    """Start a worker as the lost one was started: by whom (a schedule's stays the schedule's,
    which stops it at its window's end; the autoscaler's stays its own to remove), for which
    schedule, of which profile, on standby or not. Each worker's log names the other."""
    try:
        (replacement,) = start_workers(ctx, app, worker.account_id, worker.model_name, profile=worker.profile,
                                       standby=worker.standby, source="beat", started_by=worker.started_by,
                                       schedule_id=worker.schedule_id)
        log.info("worker %s replaces %s on %s", replacement.id, worker.worker_id, replacement.node_name)
        workerlog.write(ctx.store.redis, worker.worker_id, f"replaced by worker {replacement.id}", source="beat")
        workerlog.write(ctx.store.redis, replacement.id, f"replaces worker {worker.worker_id} (node {worker.node} "
                        f"lost; started by {worker.started_by})", source="beat")
    except CipherpoolError as exc:
        log.warning("no replacement for worker %s: %s", worker.worker_id, exc.message)
        with ctx.session() as session:
            events.record_for(session, _model_id(session, worker.worker_id), EventKind.WORKER_FAILED,
                              f"no replacement for worker {worker.worker_id}: {exc.message}", worker_id=worker.worker_id)


def keep_minimum(ctx: PlatformContext, app: Celery) -> list[Worker]:
    """Start workers for active models of enabled accounts that have fewer than ``min_workers``
    (a node lost with no replacement then, a node that came back). A model short of nodes is
    logged, not retried louder: the next tick tries again. A model whose worker failed to
    load within ``MIN_RETRY_S`` waits that long: a load that always fails is not retried
    every tick."""
    since = utcnow() - timedelta(seconds=MIN_RETRY_S)
    with ctx.session() as session:
        short = [(m.account_id, m.name, m.min_workers - len(worker_service.serving(session, model_id=m.id)))
                 for m in _with_minimum(session) if not _failed_since(session, m.id, since)]
    started: list[Worker] = []
    for account_id, name, missing in short:
        if missing <= 0:
            continue
        try:
            started += start_workers(ctx, app, account_id, name, count=missing, source="beat", started_by="reconciler")
        except CipherpoolError as exc:
            log.info("model %s is %d worker(s) short of its minimum: %s", name, missing, exc.message)
    return started


def _with_minimum(session: Session) -> list[Model]:
    return list(session.exec(
        select(Model).join(Account, col(Account.id) == Model.account_id).where(
            Model.status == ModelStatus.ACTIVE, col(Model.min_workers) > 0, col(Account.disabled_at).is_(None))
    ))


def _failed_since(session: Session, model_id: str, since: datetime) -> bool:
    """Did a worker of the model fail on its own (not with a lost node) since ``since``?"""
    return session.exec(select(Worker.id).where(
        Worker.model_id == model_id, Worker.status == WorkerStatus.FAILED, col(Worker.stopped_at) >= since,
        col(Worker.stop_reason) != StopReason.NODE_LOST.value)).first() is not None


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
