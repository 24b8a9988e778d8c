"""Tasks of the control worker (``cipherpool.control`` queue), run by beat's schedule.

Each of beat's jobs records when it finished (:mod:`cipherpool.monitoring.beat_jobs`), so
`cipherpool status`, ``/metrics`` and the gateways' watchdog see beat's jobs go stale when
beat, the control worker or the job itself stops working."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from celery import Task

from cipherpool.alerts import webhook as alert_webhook
from cipherpool.context import platform
from cipherpool.messages import Envelope, ok
from cipherpool.monitoring import beat_jobs
from cipherpool.names import (
    ALERTS_TASK,
    AUTOSCALE_TASK,
    BILLING_TASK,
    KEY_SWEEP_TASK,
    RECONCILE_TASK,
    SCHEDULE_TASK,
    WEBHOOK_TASK,
)
from cipherpool.scheduler import alerts as alert_rules
from cipherpool.scheduler import autoscale as autoscaler
from cipherpool.scheduler import keys as key_sweep
from cipherpool.scheduler import reconcile as reconciler
from cipherpool.scheduler import redeliver as redelivery
from cipherpool.scheduler import rehome
from cipherpool.scheduler.billing import tick
from cipherpool.scheduler.tick import apply_schedules
from cipherpool.tasks.app import app
from cipherpool.tasks.decorator import celery_task, platform_task

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("cipherpool.tasks")


def beat_job(task: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Record the job's run when it finishes; one that raised records nothing. A failed
    record is logged, never raised: the job's work is done."""

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            result = fn(*args, **kwargs)
            try:
                beat_jobs.record_run(platform().store.redis, task, time.time())
            except Exception:  # noqa: BLE001 - the job is done; its age will show the store's trouble
                log.warning("%s: could not record its run", task, exc_info=True)
            return result

        return run

    return decorate


@platform_task(app, RECONCILE_TASK)
@beat_job(RECONCILE_TASK)
def reconcile() -> dict[str, list[str]]:
    """Fail the workers of lost nodes and start their replacements (see scheduler.reconcile);
    send again the queries a Redis broker lost on the way to a node (see scheduler.redeliver);
    move the queries waiting for a node that no longer takes them (see scheduler.rehome)."""
    try:  # first, and on its own: it needs only Redis, and the database's trouble must not stop it
        sent = redelivery.redeliver(platform(), app).sent
    except Exception:  # noqa: BLE001 - logged; the reconciler's work (and its record) still runs
        log.exception("redelivery of lost queries failed; the next run looks again")
        sent = []
    lost = reconciler.reconcile(platform(), app)
    try:  # after the reconciler: the workers of lost nodes are failed, so their affinity queues are left
        moved = rehome.rehome(platform(), app).moved
    except Exception:  # noqa: BLE001 - logged; the next run looks again
        log.exception("moving queries out of affinity queues no node consumes failed; the next run looks again")
        moved = {}
    return {"failed": [w.worker_id for w in lost], "redelivered": sent, "moved": sorted(moved)}


@platform_task(app, BILLING_TASK)
@beat_job(BILLING_TASK)
def billing() -> dict[str, object]:
    """Charge running workers and shared execution; stop accounts at zero (see scheduler.billing)."""
    report, enforced = tick(platform(), app)
    return {
        "lines": len(report.charged),
        "charged": report.total,
        "errors": report.errors,
        "stopped": enforced.depleted,
        "low": enforced.low,
    }


@platform_task(app, SCHEDULE_TASK)
@beat_job(SCHEDULE_TASK)
def schedules() -> dict[str, object]:
    """Start and stop workers as their schedules say, each action once (see scheduler.tick)."""
    return apply_schedules(platform(), app).as_dict()


@platform_task(app, AUTOSCALE_TASK)
@beat_job(AUTOSCALE_TASK)
def autoscale() -> dict[str, list[str]]:
    """Add or remove a worker of each autoscaled model, as its load says (see scheduler.autoscale)."""
    outcomes = autoscaler.autoscale(platform(), app)
    return {
        "up": [o.model for o in outcomes if o.action is autoscaler.Action.UP],
        "down": [o.model for o in outcomes if o.action is autoscaler.Action.DOWN],
        "blocked": [o.model for o in outcomes if o.blocked],
    }


@platform_task(app, ALERTS_TASK)
@beat_job(ALERTS_TASK)
def alerts() -> dict[str, object]:
    """Evaluate every alert rule: fire, clear, queue webhook calls (see scheduler.alerts)."""
    report = alert_rules.evaluate_all(platform(), app)
    return {
        "rules": report.rules,
        "fired": report.fired,
        "cleared": report.cleared,
        "queued": report.queued,
        "errors": report.errors,
    }


@platform_task(app, KEY_SWEEP_TASK)
@beat_job(KEY_SWEEP_TASK)
def keys() -> dict[str, int]:
    """Key sets' last uses, idle and dead tokens' key sets expired, unreferenced blobs removed
    after their grace period (see scheduler.keys)."""
    return key_sweep.sweep(platform()).as_dict()


@celery_task(app, name=WEBHOOK_TASK, bind=True, max_retries=None)
def webhook(self: Task, event_id: int) -> Envelope:
    """Call one alert event's webhook; a failure worth retrying comes back after its backoff
    (Celery's retry: the same task id, a countdown). alerts.webhook counts the attempts."""
    outcome = alert_webhook.attempt(platform(), event_id)
    if outcome.retry_in_s is not None:
        raise self.retry(countdown=outcome.retry_in_s)
    return ok({"event_id": event_id, "delivery": outcome.delivery.value, "attempts": outcome.attempts, "error": outcome.error})
