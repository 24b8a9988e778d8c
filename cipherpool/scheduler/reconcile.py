"""Beat's reconciler: what should run against what runs.

Every ``CIPHERPOOL_RECONCILE_INTERVAL_S``: fail the workers of lost nodes
(:func:`cipherpool.services.reconcile.fail_lost_workers`, committed first) and start each
replacement as the lost worker was started, then bring every active model up to its
``min_workers``. Safe to run from two beats at once: a lost worker is failed, and so
replaced, only by the reconciler that ended it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from celery import Celery
from redis.exceptions import RedisError
from sqlmodel import Session, col, select

from cipherpool import lifecycle, workerlog
from cipherpool.announce import serving_changed
from cipherpool.clock import utcnow
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, Model, ModelStatus, Worker, WorkerStatus
from cipherpool.errors import CipherpoolError
from cipherpool.monitoring import beat_jobs
from cipherpool.names import RECONCILE_TASK
from cipherpool.services import events
from cipherpool.services import workers as worker_service
from cipherpool.services.nodes import NODE_STALE_HEARTBEATS
from cipherpool.services.reconcile import Lost, fail_lost_workers
from cipherpool.statuses import EventKind, StopReason

log = logging.getLogger("cipherpool.reconcile")
MIN_RETRY_S = 60.0  # after a worker of a model failed to load, beat waits this long before starting another for its minimum


def reconcile(ctx: PlatformContext, app: Celery, now: float | None = None) -> list[Lost]:
    """Beat's job: fail the workers of lost nodes (committed first) and start a replacement on
    a free node of the class for each that its model still wants; then bring every active
    model up to its ``min_workers``.

    Silence is evidence of a lost node only while the reconciler itself could watch: after a
    database outage (no node could heartbeat, and no reconcile could run) or with beat down,
    every node looks silent. So when the reconciler's own last run is older than the loss
    window, it first gives the nodes one window to be heard again (:func:`_was_away`)."""
    if _was_away(ctx, now if now is not None else time.time()):
        keep_minimum(ctx, app)
        return []
    with ctx.session() as session:
        lost = fail_lost_workers(session, ctx.settings.node_heartbeat_s)
    for worker in lost:
        log.warning("worker %s of %s failed: node %s lost", worker.worker_id, worker.model_name, worker.node)
        workerlog.write(
            ctx.store.redis, worker.worker_id, f"failed: node {worker.node} lost (no heartbeat)", level="error", source="beat"
        )
        if worker.replace:
            _replace(ctx, app, worker)
    if lost:
        serving_changed(ctx)
    keep_minimum(ctx, app)
    return lost


def _was_away(ctx: PlatformContext, now: float) -> bool:
    """Did the reconciler miss the last loss window (its last run, recorded by beat's job
    bookkeeping, is older than it)? A platform whose reconciler never ran has nothing to wait
    for."""
    window = ctx.settings.node_heartbeat_s * NODE_STALE_HEARTBEATS
    try:
        last = beat_jobs.last_runs(ctx.store.redis).get(RECONCILE_TASK)
    except RedisError:
        return False
    if last is None or now - last <= window + ctx.settings.reconcile_interval_s:
        return False
    log.warning(
        "the reconciler last ran %.0f s ago (the database or beat was away): giving nodes %.0f s to be "
        "heard again before declaring any lost",
        now - last,
        window,
    )
    return True


def _replace(ctx: PlatformContext, app: Celery, worker: Lost) -> None:
    """Start a worker as the lost one was started: by whom (a schedule's stays the schedule's,
    which stops it at its window's end; the autoscaler's stays its own to remove), for which
    schedule, of which profile, on standby or not. Each worker's log names the other."""
    try:
        (replacement,) = lifecycle.start_workers(
            ctx,
            app,
            worker.account_id,
            worker.model_name,
            profile=worker.profile,
            standby=worker.standby,
            source="beat",
            started_by=worker.started_by,
            schedule_id=worker.schedule_id,
        )
        log.info("worker %s replaces %s on %s", replacement.id, worker.worker_id, replacement.node_name)
        workerlog.write(ctx.store.redis, worker.worker_id, f"replaced by worker {replacement.id}", source="beat")
        workerlog.write(
            ctx.store.redis,
            replacement.id,
            f"replaces worker {worker.worker_id} (node {worker.node} lost; started by {worker.started_by})",
            source="beat",
        )
    except CipherpoolError as exc:
        log.warning("no replacement for worker %s: %s", worker.worker_id, exc.message)
        with ctx.session() as session:
            events.record_for(
                session,
                _model_id(session, worker.worker_id),
                EventKind.WORKER_FAILED,
                f"no replacement for worker {worker.worker_id}: {exc.message}",
                worker_id=worker.worker_id,
            )


def keep_minimum(ctx: PlatformContext, app: Celery) -> list[Worker]:
    """Start workers for active models of enabled accounts that have fewer than ``min_workers``
    (a node lost with no replacement then, a node that came back). A model short of nodes is
    logged, not retried louder: the next tick tries again. A model whose worker failed to
    load within ``MIN_RETRY_S`` waits that long: a load that always fails is not retried
    every tick."""
    since = utcnow() - timedelta(seconds=MIN_RETRY_S)
    with ctx.session() as session:
        short = [
            (m.account_id, m.name, m.min_workers - len(worker_service.serving(session, model_id=m.id)))
            for m in _with_minimum(session)
            if not _failed_since(session, m.id, since)
        ]
    started: list[Worker] = []
    for account_id, name, missing in short:
        if missing <= 0:
            continue
        try:
            started += lifecycle.start_workers(ctx, app, account_id, name, count=missing, source="beat", started_by="reconciler")
        except CipherpoolError as exc:
            log.info("model %s is %d worker(s) short of its minimum: %s", name, missing, exc.message)
    return started


def _with_minimum(session: Session) -> list[Model]:
    return list(
        session.exec(
            select(Model)
            .join(Account, col(Account.id) == Model.account_id)
            .where(Model.status == ModelStatus.ACTIVE, col(Model.min_workers) > 0, col(Account.disabled_at).is_(None))
        )
    )


def _failed_since(session: Session, model_id: str, since: datetime) -> bool:
    """Did a worker of the model fail on its own (not with a lost node) since ``since``?"""
    return (
        session.exec(
            select(Worker.id).where(
                Worker.model_id == model_id,
                Worker.status == WorkerStatus.FAILED,
                col(Worker.stopped_at) >= since,
                col(Worker.stop_reason) != StopReason.NODE_LOST.value,
            )
        ).first()
        is not None
    )


def _model_id(session: Session, worker_id: str) -> str:
    worker = session.get(Worker, worker_id)
    return worker.model_id if worker else ""
