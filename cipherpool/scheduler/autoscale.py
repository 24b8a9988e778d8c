"""Autoscaling within the pool: beat adds a worker to a model whose queue stays above its
targets and removes one from a model that stays idle, between its ``min_workers`` and
``max_workers``, within free nodes and the account's credit.

Two halves. :func:`decide` is the decision, pure (a policy row, the time and what was
measured in, a :class:`Decision` out), so every rule is a line of a table test. The beat job
:func:`autoscale` measures each model, keeps the episode it is in on its policy row
(``above_since``: its queue has been above a target since then; ``idle_since``: nothing queued
and no query computed since then), and acts through :mod:`cipherpool.lifecycle`, so a worker
the autoscaler starts or stops passes the same checks (free node, credit, max) as a user's.

Why it never flaps: a target must hold for ``scale_up_after_s`` (a brief spike adds nothing),
idleness for ``idle_after_s``, and after any change it waits ``cooldown_up_s`` before adding
and ``cooldown_down_s`` before removing. Why two beats never both act: each action is first
claimed with a compare-and-set UPDATE of ``last_scaled_at`` (``WHERE last_scaled_at IS`` the
value the beat read); the beat whose UPDATE changed no row stands aside. Each action is a
model event with its reason and its figures; an add it may not make (max_workers, no free
node, credit) is an ``autoscale_blocked`` event, once per episode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, cast

from celery import Celery
from redis import Redis
from sqlalchemy import CursorResult, update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from cipherpool import lifecycle
from cipherpool.clock import utcnow
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, AutoscalePolicy, Model, ModelEvent, ModelStatus, Worker
from cipherpool.errors import CipherpoolError
from cipherpool.monitoring.depth import model_depth
from cipherpool.monitoring.timings import KEEP_RECENT, Sample, recent_key
from cipherpool.services import events
from cipherpool.services import workers as worker_service
from cipherpool.statuses import EventKind, StopReason

log = logging.getLogger("cipherpool.autoscale")
WAIT_WINDOW_S = 30.0  # the queue wait that counts: the average over the queries computed in the last 30 s
STARTED_BY = "autoscaler"  # Worker.started_by of the workers it starts (removed first)
BLOCKED = "blocked"  # AutoscalePolicy.last_action while an add is refused


class Action(str, Enum):
    UP = "up"
    DOWN = "down"
    NONE = "none"


@dataclass(frozen=True)
class Load:
    """What the autoscaler sees of a model at one tick."""

    queue_wait_s: float | None  # average queue wait of the queries computed in the last WAIT_WINDOW_S; None: none
    depth: int  # queries waiting in its queue
    workers: int  # its workers starting or running (pending, loading, up, standby)
    min_workers: int
    max_workers: int
    last_query_at: datetime | None  # when its latest query was computed; None: none recorded


@dataclass(frozen=True)
class Decision:
    """What to do, why (the event's message), and the episode to keep on the policy row."""

    action: Action
    reason: str  # the cause, and for an action the change: "queue wait 7.2 s > target 5 s for 31 s: 1 → 2 workers"
    above_since: datetime | None
    idle_since: datetime | None
    blocked: bool = False  # it would add a worker, but the model has max_workers already
    cause: str = ""  # the reason without the change ("queue wait 7.2 s > target 5 s for 31 s")


def aware(moment: datetime | None) -> datetime | None:
    """A stored time in UTC: SQLite gives back naive digits of what was written in UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _s(seconds: float) -> str:
    return f"{seconds:.0f} s"


def pressure(policy: AutoscalePolicy, load: Load) -> str | None:
    """What is above its target now, in words; None if nothing is. Queries waiting for a model
    with no worker always are: nothing else would ever take them. The queue wait counts only
    while queries wait: it is the average of queries already computed, so once the queue is
    empty it tells of a burst that is over (and would hold off idleness for a whole window)."""
    if load.depth == 0:
        return None
    if load.workers == 0:
        return f"{load.depth} queries waiting with no worker"
    found = []
    wait, target_wait = load.queue_wait_s, policy.target_queue_wait_s
    if wait is not None and target_wait is not None and wait > target_wait:
        found.append(f"queue wait {wait:.1f} s > target {target_wait:g} s")
    per_worker, target_depth = load.depth / load.workers, policy.target_queue_depth
    if target_depth is not None and per_worker > target_depth:
        found.append(f"queue depth {load.depth} ({per_worker:.1f} per worker) > target {target_depth} per worker")
    return " and ".join(found) or None


def cooldown_left(policy: AutoscalePolicy, now: datetime, cooldown_s: float) -> float:
    """Seconds before the autoscaler may change the model again (0: it may now)."""
    last = aware(policy.last_scaled_at)
    return 0.0 if last is None else max(0.0, cooldown_s - (now - last).total_seconds())


def decide(policy: AutoscalePolicy, now: datetime, load: Load) -> Decision:
    """Add one worker when a target has been exceeded for ``scale_up_after_s`` (or queries
    wait with no worker), the up cool-down has passed and the model is below its maximum;
    remove one when it has been idle for ``idle_after_s``, is above its minimum and the down
    cool-down has passed; else nothing, with the reason. Never outside [min, max]: below its
    minimum the reconciler starts workers, above its maximum a user lowered it."""
    above = pressure(policy, load)
    above_since = (aware(policy.above_since) or now) if above else None
    idle_since = _idle_since(policy, now, load) if above is None and load.depth == 0 else None
    if load.workers < load.min_workers:
        return Decision(
            Action.NONE,
            f"below min_workers ({load.workers} < {load.min_workers}): the reconciler starts those",
            above_since,
            idle_since,
        )
    if above is not None and above_since is not None:
        action, cause, blocked = _up(policy, now, load, above, above_since)
    elif idle_since is not None:
        action, cause, blocked = (*_down(policy, now, load, idle_since), False)
    else:
        action, cause, blocked = Action.NONE, "within targets", False
    change = {Action.UP: 1, Action.DOWN: -1}.get(action)
    reason = cause if change is None else f"{cause}: {load.workers} → {load.workers + change} workers"
    return Decision(action, reason, above_since, idle_since, blocked, cause)


def _idle_since(policy: AutoscalePolicy, now: datetime, load: Load) -> datetime:
    """Since when nothing was queued and no query computed: when the queue was first seen
    empty in this episode, or the latest query if it came after."""
    since = aware(policy.idle_since) or now
    last = aware(load.last_query_at)
    return min(max(since, last), now) if last is not None else since


def _up(policy: AutoscalePolicy, now: datetime, load: Load, above: str, since: datetime) -> tuple[Action, str, bool]:
    held = (now - since).total_seconds()
    if held < policy.scale_up_after_s:
        return Action.NONE, f"{above} for {_s(held)} of {_s(policy.scale_up_after_s)}", False
    left = cooldown_left(policy, now, policy.cooldown_up_s)
    if left > 0:
        return Action.NONE, f"{above} for {_s(held)}; cool-down: {_s(left)} left", False
    if load.workers >= load.max_workers:
        return (
            Action.NONE,
            f"{above} for {_s(held)}, but the model has its max_workers ({load.max_workers}) "
            f"already: raise it to let the autoscaler add workers",
            True,
        )
    return Action.UP, f"{above} for {_s(held)}", False


def _down(policy: AutoscalePolicy, now: datetime, load: Load, since: datetime) -> tuple[Action, str]:
    idle = (now - since).total_seconds()
    if load.workers == 0:
        return Action.NONE, "no worker and nothing queued"
    if idle < policy.idle_after_s:
        return Action.NONE, f"idle for {_s(idle)} of {_s(policy.idle_after_s)}"
    if load.workers <= load.min_workers:
        return Action.NONE, f"idle for {_s(idle)}, at min_workers ({load.min_workers})"
    left = cooldown_left(policy, now, policy.cooldown_down_s)
    if left > 0:
        return Action.NONE, f"idle for {_s(idle)}; cool-down: {_s(left)} left"
    return Action.DOWN, f"idle for {_s(idle)} (no query computed, nothing queued)"


# ---- what the beat measures ------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """A model's figures as recorded: its query times (Redis) and its queue (the broker)."""

    queue_wait_s: float | None
    depth: int
    last_query_at: datetime | None


Gauge = Callable[[Model, datetime], Reading]


def recent_wait(samples: list[Sample], now: datetime, window_s: float = WAIT_WINDOW_S) -> tuple[float | None, datetime | None]:
    """The average queue wait of the samples computed within ``window_s`` before ``now`` (None:
    none was), and the newest sample's time (``samples`` newest first, as the list keeps them)."""
    start = now.timestamp() - window_s
    waits = [s.queue_wait_s for s in samples if s.at > start]
    last = datetime.fromtimestamp(samples[0].at, UTC) if samples else None
    return (sum(waits) / len(waits) if waits else None), last


def recorded(redis: Redis, app: Celery) -> Gauge:
    """The gauge beat uses: the latest queries the nodes recorded
    (:mod:`cipherpool.monitoring.timings`) and the broker's count of the model's queue."""

    def read(model: Model, now: datetime) -> Reading:
        raw = cast(list[bytes], redis.lrange(recent_key(model.id), 0, KEEP_RECENT - 1))
        wait, last = recent_wait([Sample.decode(item) for item in raw], now)
        return Reading(wait, model_depth(app, model, redis), last)

    return read


# ---- the beat job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One model's tick, as the task reports it."""

    model: str
    action: Action
    reason: str
    blocked: bool = False
    worker_id: str | None = None


def autoscale(ctx: PlatformContext, app: Celery, now: datetime | None = None, gauge: Gauge | None = None) -> list[Outcome]:
    """Beat's job: one tick over the enabled policies of active models of enabled accounts. A
    model whose figures cannot be read (broker, Redis) is skipped this tick, and logged: the
    others still scale."""
    now = aware(now) or utcnow()
    gauge = gauge or recorded(ctx.store.redis, app)
    with ctx.session() as session:
        model_ids = list(
            session.exec(
                select(AutoscalePolicy.model_id)
                .join(Model, col(Model.id) == AutoscalePolicy.model_id)
                .join(Account, col(Account.id) == Model.account_id)
                .where(
                    col(AutoscalePolicy.enabled).is_(True), Model.status == ModelStatus.ACTIVE, col(Account.disabled_at).is_(None)
                )
                .order_by(col(AutoscalePolicy.model_id))
            )
        )
    outcomes = []
    for model_id in model_ids:
        try:
            outcome = scale_model(ctx, app, model_id, now, gauge)
        except Exception:  # noqa: BLE001 - one model's trouble must not stop the others' scaling
            log.exception("autoscaling model %s failed this tick", model_id)
            continue
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def scale_model(ctx: PlatformContext, app: Celery, model_id: str, now: datetime, gauge: Gauge) -> Outcome | None:
    """Measure, decide, keep the episode on the policy row, then act on the decision."""
    with ctx.session() as session:
        seen, model = session.get(AutoscalePolicy, model_id), session.get(Model, model_id)
        workers = worker_service.serving(session, model_id=model_id)
    if seen is None or model is None:
        return None  # removed meanwhile
    reading = gauge(model, now)
    load = Load(reading.queue_wait_s, reading.depth, len(workers), model.min_workers, model.max_workers, reading.last_query_at)
    decision = decide(seen, now, load)
    with ctx.session() as session:
        session.execute(
            update(AutoscalePolicy)
            .where(col(AutoscalePolicy.model_id) == model_id)
            .values(above_since=decision.above_since, idle_since=decision.idle_since)
        )
    if decision.action is Action.UP:
        return _add(ctx, app, model, seen, decision, now)
    if decision.action is Action.DOWN:
        return _remove(ctx, app, model, seen, workers, decision, now)
    if decision.blocked:
        with ctx.session() as session:
            _blocked(session, model, seen, decision, decision.reason, now, claimed_at=seen.last_scaled_at)
    return Outcome(model.name, Action.NONE, decision.reason, decision.blocked)


def _last_scaled_is(value: datetime | None) -> ColumnElement[bool]:
    column = col(AutoscalePolicy.last_scaled_at)
    return column.is_(None) if value is None else column == value


def _compare_and_set(session: Session, model_id: str, seen: datetime | None, **values: Any) -> bool:
    """Set ``values`` on the policy if its ``last_scaled_at`` is still ``seen``: a claim only
    one beat wins (the loser's UPDATE matches no row). It also locks the row until commit."""
    result = cast(
        CursorResult[Any],
        session.execute(
            update(AutoscalePolicy)
            .where(col(AutoscalePolicy.model_id) == model_id, col(AutoscalePolicy.enabled).is_(True), _last_scaled_is(seen))
            .values(**values)
        ),
    )
    return result.rowcount == 1


def _claim(ctx: PlatformContext, policy: AutoscalePolicy, action: Action, reason: str, now: datetime) -> bool:
    with ctx.session() as session:
        return _compare_and_set(
            session, policy.model_id, policy.last_scaled_at, last_scaled_at=now, last_action=action.value, last_reason=reason
        )


def _record(session: Session, model_id: str, kind: EventKind, message: str, now: datetime, worker_id: str | None = None) -> None:
    """A model event at the tick's time (the decision's moment, also in a test's clock)."""
    model = session.get(Model, model_id)
    if model is not None:
        events.record(session, model, kind, message, worker_id=worker_id).at = now


def _add(ctx: PlatformContext, app: Celery, model: Model, seen: AutoscalePolicy, decision: Decision, now: datetime) -> Outcome:
    """Claim, start one worker (lifecycle checks nodes, credit and max), record why; a refusal
    gives the claim back (no cool-down for what did not happen) and reports the add blocked."""
    if not _claim(ctx, seen, Action.UP, decision.reason, now):
        return Outcome(model.name, Action.NONE, "another beat acted on this model")

    def why(session: Session, worker: Worker) -> None:
        message = f"{decision.reason} (worker {worker.id} on {worker.node_name})"
        _record(session, model.id, EventKind.AUTOSCALED_UP, message, now, worker.id)

    try:
        (started,) = lifecycle.start_workers(
            ctx, app, model.account_id, model.name, count=1, source="beat", started_by=STARTED_BY, why=why
        )
    except CipherpoolError as refusal:
        why_not = f"{decision.cause}, but a worker could not be added: {refusal.message}"
        with ctx.session() as session:
            _blocked(session, model, seen, decision, why_not, now, claimed_at=now)
        return Outcome(model.name, Action.NONE, why_not, blocked=True)
    log.info("model %s: added worker %s (%s)", model.name, started.id, decision.reason)
    return Outcome(model.name, Action.UP, decision.reason, worker_id=started.id)


def _blocked(
    session: Session,
    model: Model,
    seen: AutoscalePolicy,
    decision: Decision,
    why: str,
    now: datetime,
    claimed_at: datetime | None,
) -> None:
    """Mark the policy blocked (giving back a claim made at ``claimed_at``) and record one
    AUTOSCALE_BLOCKED event per episode of pressure: the UPDATE locks the row first, so a
    second beat reads the first one's event before deciding to write its own."""
    if not _compare_and_set(
        session, model.id, claimed_at, last_scaled_at=seen.last_scaled_at, last_action=BLOCKED, last_reason=why
    ):
        return  # another beat scaled the model meanwhile
    episode = decision.above_since or now
    reported = session.exec(
        select(ModelEvent.id).where(
            ModelEvent.model_id == model.id, ModelEvent.kind == EventKind.AUTOSCALE_BLOCKED.value, col(ModelEvent.at) >= episode
        )
    ).first()
    if reported is None:
        log.info("model %s: autoscaling blocked: %s", model.name, why)
        _record(session, model.id, EventKind.AUTOSCALE_BLOCKED, why, now)


def pick_worker(workers: list[Worker]) -> Worker | None:
    """The worker to remove: the newest the autoscaler started, else the newest not started by
    a schedule (a schedule stops its own when its window closes); None if every one was."""
    ours = [w for w in workers if w.started_by == STARTED_BY]
    candidates = ours or [w for w in workers if w.started_by != "schedule"]
    return max(candidates, key=lambda w: (aware(w.created_at), w.id)) if candidates else None


def _remove(
    ctx: PlatformContext,
    app: Celery,
    model: Model,
    seen: AutoscalePolicy,
    workers: list[Worker],
    decision: Decision,
    now: datetime,
) -> Outcome:
    """Claim, ask one worker's node to unbind it (queries in flight finish), record why. A stop
    refused before it was recorded gives the claim back; the next tick tries again."""
    victim = pick_worker(workers)
    if victim is None:
        return Outcome(model.name, Action.NONE, f"{decision.cause}, but every worker was started by a schedule")
    if not _claim(ctx, seen, Action.DOWN, decision.reason, now):
        return Outcome(model.name, Action.NONE, "another beat acted on this model")
    stopped, trouble = _stop(ctx, app, model, victim)
    if not stopped:
        with ctx.session() as session:
            _compare_and_set(
                session,
                model.id,
                now,
                last_scaled_at=seen.last_scaled_at,
                last_action=seen.last_action,
                last_reason=seen.last_reason,
            )
        return Outcome(model.name, Action.NONE, f"could not stop worker {victim.id}: {trouble}")
    log.info("model %s: removed worker %s (%s)", model.name, victim.id, decision.reason)
    note = f"; its node could not be told yet: {trouble}" if trouble else ""
    with ctx.session() as session:
        _record(
            session,
            model.id,
            EventKind.AUTOSCALED_DOWN,
            f"{decision.reason} (worker {victim.id} on {victim.node_name}{note})",
            now,
            victim.id,
        )
    return Outcome(model.name, Action.DOWN, decision.reason, worker_id=victim.id)


def _stop(ctx: PlatformContext, app: Celery, model: Model, victim: Worker) -> tuple[bool, str]:
    """Stop the worker: (whether its stop is recorded, what went wrong). The stop is committed
    before its node is told, so a broker that fails after it leaves the worker stopping, as a
    user's stop would: that removal stands, and its event says what went wrong."""
    try:
        lifecycle.stop_worker(ctx, app, model.account_id, victim.id, reason=StopReason.AUTOSCALER, source="beat")
        return True, ""
    except CipherpoolError as exc:
        log.warning("model %s: could not stop worker %s: %s", model.name, victim.id, exc.message)
        with ctx.session() as session:
            row = session.get(Worker, victim.id)
            return row is not None and not row.status.wanted, exc.message
