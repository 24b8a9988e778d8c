"""The figures a provider reads about its models: query times, queue, workers.

Built from what nodes recorded (:mod:`.timings`), what waits in the broker (:mod:`.depth`)
and the database's workers; nothing asks a node, so a live view refreshing every second
costs a few Redis reads and one broker call per model, whatever the pool is doing.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict

from celery import Celery
from redis import Redis
from sqlmodel import Session, col, or_, select

from cipherpool.api.schemas import CurrentFigures, ModelStats, WorkerStats, WorkerTimings
from cipherpool.db.tables import Account, Model, Worker
from cipherpool.errors import InvalidInput
from cipherpool.monitoring import depth, timings
from cipherpool.monitoring.timings import MAX_WINDOW_S, ModelTimings
from cipherpool.services import models as model_service
from cipherpool.statuses import WANTED


def check_window(window_s: int) -> int:
    if not 60 <= window_s <= MAX_WINDOW_S:
        raise InvalidInput(f"A window is between 60 s and {MAX_WINDOW_S} s (a day), not {window_s} s.")
    return window_s


def current(found: timings.Current) -> CurrentFigures:
    return CurrentFigures(**asdict(found))


def models_of(session: Session, account: Account, name: str | None) -> list[Model]:
    """The account's models to report on (one, by name: NotFound if it is not the account's)."""
    return [model_service.get_model(session, account, name)] if name else model_service.list_models(session, account)


def _workers(session: Session, model: Model, seen: set[str]) -> list[Worker]:
    """The model's wanted workers, and those that served in the window (stopped since)."""
    query = select(Worker).where(
        Worker.model_id == model.id, or_(col(Worker.status).in_(list(WANTED)), col(Worker.id).in_(list(seen)))
    )
    return list(session.exec(query.order_by(col(Worker.created_at))).all())


def worker_row(found: ModelTimings, worker_id: str, last: int, worker: Worker | None = None) -> WorkerTimings:
    return WorkerTimings(
        worker_id=worker_id,
        node=worker.node_name if worker else None,
        status=worker.status.value if worker else None,
        started_by=worker.started_by if worker else None,
        window=found.window_figures(worker_id),
        all_time=found.all_time_figures(worker_id),
        current=current(found.current(last, worker_id)),
        key_bytes=found.key_bytes.get(worker.node_name) if worker and worker.node_name else None,
    )


def model_stats(
    session: Session, redis: Redis, app: Celery, model: Model, *, window_s: int, last: int, now: float | None = None
) -> ModelStats:
    """One model's :class:`ModelStats`, read now."""
    now = time.time() if now is None else now
    found = timings.read(redis, model.id, window_s, now)
    workers = _workers(session, model, set(found.workers_window))
    rows = [worker_row(found, w.id, last, w) for w in workers]
    if timings.SHARED in found.workers:
        rows.append(worker_row(found, timings.SHARED, last))
    try:
        waiting: int | None = depth.model_depth(app, model, redis)
    except Exception:  # noqa: BLE001 - figures without the depth beat no figures
        waiting = None
    return ModelStats(
        model=model.name,
        model_id=model.id,
        status=model.status.value,
        at=now,
        window_s=window_s,
        span_s=round(found.span_s, 3),
        queue_depth=waiting,
        workers_by_status=dict(Counter(w.status.value for w in workers if w.status in WANTED)),
        window=found.window_figures(),
        all_time=found.all_time_figures(),
        current=current(found.current(last)),
        workers=rows,
        refusals=found.refusals_window,
        refusals_all_time=found.refusals_all_time,
    )


def with_timings(report: WorkerStats, redis: Redis, app: Celery, model: Model, *, window_s: int, last: int) -> WorkerStats:
    """A node's live report of a worker, with the worker's recorded times and its model's queue."""
    found = timings.read(redis, model.id, window_s)
    worker_id = report.worker_id or ""
    try:
        waiting: int | None = depth.model_depth(app, model, redis)
    except Exception:  # noqa: BLE001
        waiting = None
    return report.model_copy(
        update={
            "window_s": window_s,
            "window": found.window_figures(worker_id),
            "current": current(found.current(last, worker_id)),
            "queue_depth": waiting,
        }
    )
