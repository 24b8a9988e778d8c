"""Beat's alert job: compare each rule's figure with its threshold, fire and clear.

A rule fires when its figure is above the threshold (``value > threshold``) and clears when
it is back to or below it. The figures are the ones every reader shares
(:mod:`cipherpool.monitoring.timings`, :mod:`cipherpool.monitoring.depth`), over the rule's
window; "current query time" is the average of the latest ``settings.stats_recent`` queries
computed within the window.

No data: a time or a rate with no query in the window has no value (``None``). That clears
a firing alert (recorded with no value) and never fires one: nothing is known to be slow, and
an alert left firing for a model nobody queries any more would never end. A model whose
queries pile up unanswered is caught by ``queue_depth``, which always has a value.

Two beats (or a beat and a slow earlier run) may evaluate a rule at once: the state changes
with a compare-and-set UPDATE (``WHERE state = <the state read>``, and the threshold and
window read, so that a rule set again meanwhile is left to the next round), and only the
evaluation whose UPDATE changed the row records the event. Each fired or cleared event is a
row of ``alert_events`` and an event of the model; one with a webhook is ``pending`` and its
call is queued on the control queue (:mod:`cipherpool.alerts.webhook`), after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from celery import Celery
from sqlalchemy import CursorResult, update
from sqlmodel import Session, col, select

from cipherpool.alerts import webhook
from cipherpool.context import PlatformContext
from cipherpool.db.tables import AlertEvent, AlertRule, Model
from cipherpool.monitoring import timings
from cipherpool.monitoring.depth import known_affinity_queues, model_queues, queue_depth
from cipherpool.services import events
from cipherpool.statuses import AlertEventKind, AlertMetric, AlertState, EventKind, WebhookDelivery

log = logging.getLogger("cipherpool.alerts")


@dataclass(frozen=True)
class Seen:
    """A rule as this evaluation read it (plain values: no row outlives its session)."""

    id: str
    account_id: str
    model_id: str
    model_name: str
    hardware: str
    metric: AlertMetric
    threshold: float
    window_s: int
    state: AlertState
    webhook: bool

    @classmethod
    def of(cls, rule: AlertRule, model: Model) -> Seen:
        return cls(
            rule.id,
            rule.account_id,
            rule.model_id,
            model.name,
            model.hardware,
            AlertMetric(rule.metric),
            rule.threshold,
            rule.window_s,
            AlertState(rule.state),
            rule.webhook_url is not None,
        )


@dataclass
class Evaluated:
    """What one round did: rules read, events recorded (ids), webhook calls queued, errors."""

    rules: int = 0
    fired: list[int] = field(default_factory=list)
    cleared: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def measure(
    metric: AlertMetric, figures: timings.ModelTimings | None, *, recent: int, depth: int | None = None, now: float | None = None
) -> float | None:
    """The figure ``metric`` names, from a model's recorded times (``figures``) or its queue
    ``depth``; None where no query in the window gives it a value."""
    if metric is AlertMetric.QUEUE_DEPTH:
        return None if depth is None else float(depth)
    if figures is None:
        raise ValueError(f"{metric.value} is measured on recorded query times")
    if metric is AlertMetric.CURRENT_QUERY_S:
        since = (time.time() if now is None else now) - figures.window_s
        return timings.current([s for s in figures.recent if s.at >= since], recent).average_query_s
    window = figures.window_figures()
    by_metric = {
        AlertMetric.AVERAGE_QUERY_S: window.average_query_s,
        AlertMetric.QUEUE_WAIT_S: window.average_queue_wait_s,
        AlertMetric.ERROR_RATE: window.error_rate,
    }
    return by_metric[metric]


def state_for(value: float | None, threshold: float) -> AlertState:
    """Firing above the threshold; ok at or below it, and with no value (see the module)."""
    return AlertState.FIRING if value is not None and value > threshold else AlertState.OK


def read_figure(
    ctx: PlatformContext, app: Celery, seen: Seen, now: float, cache: dict[tuple[str, int], timings.ModelTimings] | None = None
) -> float | None:
    """The rule's figure now: its model's queue, or its recorded times over its window (read
    once per model and window in a round, through ``cache``)."""
    if seen.metric is AlertMetric.QUEUE_DEPTH:
        queues = model_queues(seen.hardware, seen.model_id, known_affinity_queues(ctx.store.redis))
        return measure(seen.metric, None, recent=0, depth=sum(queue_depth(app, q) for q in queues))
    cache = {} if cache is None else cache
    key = (seen.model_id, seen.window_s)
    if key not in cache:
        cache[key] = timings.read(ctx.store.redis, seen.model_id, seen.window_s, now)
    return measure(seen.metric, cache[key], recent=ctx.settings.stats_recent, now=now)


def message(seen: Seen, state: AlertState, value: float | None) -> str:
    """The model event's text: what crossed what."""
    if state is AlertState.FIRING:
        return f"alert {seen.metric.value} fired: {value:.6g} > {seen.threshold:g} (window {seen.window_s} s)"
    if value is None:
        return f"alert {seen.metric.value} cleared: no query in the last {seen.window_s} s"
    return f"alert {seen.metric.value} cleared: {value:.6g} <= {seen.threshold:g} (window {seen.window_s} s)"


def transition(session: Session, seen: Seen, value: float | None, now: datetime) -> AlertEvent | None:
    """Record the figure; if it crossed the threshold, change the state by compare-and-set and
    record the event: None when nothing changed, or when another evaluation changed it first."""
    state = state_for(value, seen.threshold)
    as_read = (col(AlertRule.id) == seen.id, col(AlertRule.threshold) == seen.threshold, col(AlertRule.window_s) == seen.window_s)
    if state is seen.state:
        session.execute(update(AlertRule).where(*as_read).values(value=value, evaluated_at=now))
        return None
    # An UPDATE's result is a CursorResult (it has the rowcount); Session.execute is typed for any statement.
    changed = cast(
        CursorResult[Any],
        session.execute(
            update(AlertRule)
            .where(*as_read, col(AlertRule.state) == seen.state.value)
            .values(state=state.value, value=value, evaluated_at=now, changed_at=now)
        ),
    )
    if changed.rowcount != 1:
        return None  # another evaluation won, or the rule was set again or removed meanwhile
    firing = state is AlertState.FIRING
    event = AlertEvent(
        rule_id=seen.id,
        account_id=seen.account_id,
        model_id=seen.model_id,
        metric=seen.metric.value,
        kind=(AlertEventKind.FIRED if firing else AlertEventKind.CLEARED).value,
        value=value,
        threshold=seen.threshold,
        at=now,
        delivery=(WebhookDelivery.PENDING if seen.webhook else WebhookDelivery.NONE).value,
    )
    session.add(event)
    events.record_for(
        session, seen.model_id, EventKind.ALERT_FIRED if firing else EventKind.ALERT_CLEARED, message(seen, state, value)
    )
    session.flush()
    return event


def load_rules(session: Session) -> list[Seen]:
    """Every rule, with what evaluating it needs of its model."""
    rows = session.exec(select(AlertRule, Model).join(Model, col(Model.id) == AlertRule.model_id).order_by(col(AlertRule.id)))
    return [Seen.of(rule, model) for rule, model in rows]


Queue = Callable[[Celery, int], bool]  # queue one event's webhook call; False if the broker refused it


def evaluate_all(ctx: PlatformContext, app: Celery, now: float | None = None, queue: Queue | None = None) -> Evaluated:
    """One round over every rule, each in its own transaction, so that one rule's failure (a
    broker that cannot tell a queue's depth) costs that rule this round only. A webhook call
    is queued once its event is committed; one the broker refused is marked failed."""
    queue = queue or webhook.queue_call
    now = time.time() if now is None else now
    report, cache = Evaluated(), dict[tuple[str, int], timings.ModelTimings]()
    with ctx.session() as session:
        rules = load_rules(session)
    report.rules = len(rules)
    for seen in rules:
        try:
            recorded = _evaluate_one(ctx, app, seen, now, cache)
        except Exception as exc:  # noqa: BLE001 - one rule's failure must not stop the others
            log.warning("alert %s (%s of %s) not evaluated: %s", seen.id, seen.metric.value, seen.model_name, exc)
            report.errors.append(f"{seen.id}: {exc}")
            continue
        if recorded is None:
            continue
        event_id, kind = recorded
        (report.fired if kind is AlertEventKind.FIRED else report.cleared).append(event_id)
        if seen.webhook:
            if queue(app, event_id):
                report.queued.append(event_id)
            else:
                webhook.give_up(ctx, event_id, "the webhook call could not be queued (broker unreachable)")
    return report


def _evaluate_one(
    ctx: PlatformContext, app: Celery, seen: Seen, now: float, cache: dict[tuple[str, int], timings.ModelTimings]
) -> tuple[int, AlertEventKind] | None:
    """Read the rule's figure and apply it; the event recorded (committed), if any."""
    value = read_figure(ctx, app, seen, now, cache)
    with ctx.session() as session:
        event = transition(session, seen, value, datetime.fromtimestamp(now, UTC))
        if event is None or event.id is None:
            return None
        return event.id, AlertEventKind(event.kind)
