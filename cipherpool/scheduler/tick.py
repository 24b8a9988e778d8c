"""Beat's job for worker schedules (``SCHEDULE_TASK``, every ``schedule_interval_s``): start a
schedule's workers while one of its windows is open, stop them once it has closed or the
schedule is paused; and :func:`remove_schedule`, which stops them at once.

Exactly once, even with two beats. Each start or stop of a window is a ``ScheduleAction`` row,
unique per (schedule, window start, action): a beat claims it by inserting the row and
committing before it acts; a beat whose insert the database refuses skips it (another beat
has it, or the schedule was removed). A failed action (a start refused: no free node, no
credits, the model inactive) is retried on later ticks while it still applies, claimed by a
compare-and-set UPDATE on (status, attempts), so two beats never both retry; a claim left by
a beat that died (older than ``STALE_CLAIM_S``) is taken over the same way.

A start tops the schedule up to ``workers`` of its own (running ones of an earlier window
count), so a retry, a takeover or a window that opens as the last one closes never starts
too many. Catch-up, after beat was down: a window still open is started; the latest window
that opened and closed unseen is recorded as ``skipped`` (its stop still runs, for workers
of the windows before it); a stop missed while the next window has opened already is not
applied: the open window wants those very workers, so they carry over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import CursorResult, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from cipherpool import lifecycle
from cipherpool.clock import utcnow
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Model, Schedule, ScheduleAction, Worker
from cipherpool.errors import CipherpoolError
from cipherpool.scheduler import schedules, windows
from cipherpool.scheduler.windows import utc
from cipherpool.services import events
from cipherpool.services.accounts import get_account
from cipherpool.statuses import WANTED, EventKind, ScheduleActionStatus, StopReason

log = logging.getLogger("cipherpool.scheduler")
STALE_CLAIM_S = 300.0  # a claim this old was left by a beat that died: another may take it over
START, STOP = "start", "stop"
Status = ScheduleActionStatus


@dataclass(frozen=True)
class Due:
    """An action a schedule needs now, and what doing it needs (read in the tick's first session)."""

    schedule_id: str
    account_id: str
    model_id: str
    model_name: str
    workers: int
    profile: str | None
    action: str  # start | stop
    key: datetime  # the window's start (from the schedule's last change, if later), or when it was paused
    end: datetime | None  # the window's end (None for a pause's stop)
    why: str  # what the messages say it is for


@dataclass
class Report:
    """What one tick did, by schedule id (the task's result, shown in Flower)."""

    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: int = 0
    began: float = field(default_factory=lambda: time.monotonic())  # when the tick read what was due

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "stopped": self.stopped,
            "failed": self.failed,
            "skipped": self.skipped,
            "errors": self.errors,
        }


def apply_schedules(ctx: PlatformContext, app: Celery, now: datetime | None = None) -> Report:
    """One tick: every schedule's due start or stop, each claimed before it is applied. One
    schedule's trouble (logged) never keeps the others from being applied."""
    now = utc(now or utcnow())
    with ctx.session() as session:
        due = due_actions(session, now)
    report = Report()
    for item in due:
        try:
            apply_due(ctx, app, item, now, report)
        except Exception:  # noqa: BLE001 - logged with its traceback; the next tick tries again
            log.exception("schedule %s: its %s could not be applied", item.schedule_id, item.action)
            report.errors += 1
    return report


def due_actions(session: Session, now: datetime) -> list[Due]:
    """What each schedule needs at ``now`` (nothing, a start, or a stop), from the database."""
    rows = session.exec(select(Schedule, Model.name).join(Model, col(Model.id) == Schedule.model_id)).all()
    running = dict(
        session.exec(
            select(Worker.schedule_id, func.count())
            .where(col(Worker.schedule_id).is_not(None), col(Worker.status).in_(WANTED))
            .group_by(Worker.schedule_id)
        ).all()
    )
    found = []
    for schedule, model_name in rows:
        try:
            item = decide(schedule, model_name, now, running.get(schedule.id, 0) > 0)
        except CipherpoolError as exc:  # a definition that no longer evaluates (its zone left tzdata)
            log.warning("schedule %s cannot be evaluated: %s", schedule.id, exc.message)
            continue
        if item is not None:
            found.append(item)
    return found


def decide(schedule: Schedule, model_name: str, now: datetime, has_workers: bool) -> Due | None:
    """A start while a window is open; a stop once the latest window has closed (if it closed
    after the schedule's last change) or while paused with workers; else nothing."""
    since = utc(schedule.updated_at)

    def due(action: str, key: datetime, end: datetime | None, why: str) -> Due:
        return Due(
            schedule.id,
            schedule.account_id,
            schedule.model_id,
            model_name,
            schedule.workers,
            schedule.profile,
            action,
            key,
            end,
            why,
        )

    if schedule.paused:
        return due(STOP, since, None, "paused") if has_workers else None
    evaluation = windows.evaluate(schedule, now)
    if evaluation.open is not None:
        opened = evaluation.open
        return due(START, max(opened.start, since), opened.end, _span(opened.start, opened.end))
    closed = evaluation.last_closed
    if closed is None or closed.end <= since:
        return None
    return due(STOP, max(closed.start, since), closed.end, _span(closed.start, closed.end))


def _span(start: datetime, end: datetime) -> str:
    return f"window {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"


# ---- claims -------------------------------------------------------------------------------


def apply_due(ctx: PlatformContext, app: Celery, item: Due, now: datetime, report: Report) -> None:
    """Claim one due action and apply it; nothing if another beat has it or it is done."""
    if item.action == STOP and item.end is not None and _skip_unseen_start(ctx, item, now):
        report.skipped.append(item.schedule_id)
    claimed = claim(ctx, item, now)
    if claimed is None:
        return
    row_id, previous = claimed
    if item.action == START:
        _start(ctx, app, item, row_id, previous, now, report)
    else:
        _stop(ctx, app, item, row_id, now, report)


def claim(ctx: PlatformContext, item: Due, now: datetime) -> tuple[int, str] | None:
    """Claim the action: insert it, or take over a failed or stale one. Its row id and its
    previous message; None if it is done or skipped, or another beat has it."""
    with ctx.session() as session:
        row = _find(session, item.schedule_id, item.key, item.action)
    if row is None:
        inserted = _insert(ctx, item, Status.CLAIMED, "", now)
        return None if inserted is None else (inserted, "")
    stale = row.status == Status.CLAIMED.value and utc(row.at) < now - timedelta(seconds=STALE_CLAIM_S)
    if row.status != Status.FAILED.value and not stale:
        return None
    assert row.id is not None
    return (row.id, row.message) if take_over(ctx, row, now) else None


def take_over(ctx: PlatformContext, seen: ScheduleAction, now: datetime) -> bool:
    """Claim an action row as it was ``seen`` (failed, or claimed long ago): a compare-and-set
    on its status and attempts, so of two beats that saw it alike only one gets it."""
    with ctx.session() as session:
        taken = cast(
            CursorResult[Any],
            session.execute(
                update(ScheduleAction)
                .where(
                    col(ScheduleAction.id) == seen.id,
                    col(ScheduleAction.status) == seen.status,
                    col(ScheduleAction.attempts) == seen.attempts,
                )
                .values(status=Status.CLAIMED.value, attempts=seen.attempts + 1, at=now)
            ),
        )
    return taken.rowcount == 1


def _find(session: Session, schedule_id: str, key: datetime, action: str) -> ScheduleAction | None:
    return session.exec(
        select(ScheduleAction).where(
            ScheduleAction.schedule_id == schedule_id, ScheduleAction.window_start == key, ScheduleAction.action == action
        )
    ).first()


def _insert(
    ctx: PlatformContext, item: Due, status: Status, message: str, now: datetime, action: str | None = None
) -> int | None:
    """Insert an action row and commit; None if the database refuses it (it exists already,
    or the schedule was removed meanwhile)."""
    try:
        with ctx.session() as session:
            row = ScheduleAction(
                schedule_id=item.schedule_id,
                window_start=item.key,
                action=action or item.action,
                status=status.value,
                attempts=1,
                at=now,
                message=message,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            return row.id
    except IntegrityError:
        return None


def _skip_unseen_start(ctx: PlatformContext, item: Due, now: datetime) -> bool:
    """A closed window whose start no beat saw: record it skipped (once) before its stop."""
    with ctx.session() as session:
        if _find(session, item.schedule_id, item.key, START) is not None:
            return False
    message = f"{item.why} opened and closed while no beat was running: not started"
    if _insert(ctx, item, Status.SKIPPED, message, now, action=START) is None:
        return False
    log.warning("schedule %s: %s", item.schedule_id, message)
    return True


def _finish(
    ctx: PlatformContext, item: Due, row_id: int, status: Status, message: str, now: datetime, event: EventKind | None
) -> None:
    """Record how a claimed action went and, if ``event``, the model's event, in one commit."""
    with ctx.session() as session:
        row = session.get(ScheduleAction, row_id)
        if row is not None:  # None: the schedule was removed meanwhile, with its actions
            row.status, row.message, row.at = status.value, message[:1000], now
            session.add(row)
        if event is not None:
            events.record_for(session, item.model_id, event, f"schedule {item.schedule_id}: {message}")


# ---- starting and stopping ----------------------------------------------------------------


def _start(ctx: PlatformContext, app: Celery, item: Due, row_id: int, previous: str, now: datetime, report: Report) -> None:
    """Top the schedule up to its ``workers``; a refusal is recorded (an event when its reason
    is new) and retried by a later tick."""
    with ctx.session() as session:
        have = len(schedules.own_workers(session, item.schedule_id))
    missing = item.workers - have
    if missing <= 0:
        _finish(ctx, item, row_id, Status.DONE, f"{item.why}: its {have} worker(s) were running already", now, None)
        return
    try:
        started = lifecycle.start_workers(
            ctx,
            app,
            item.account_id,
            item.model_name,
            count=missing,
            profile=item.profile,
            source="beat",
            started_by="schedule",
            schedule_id=item.schedule_id,
        )
    except CipherpoolError as exc:
        message = f"{item.why}: could not start {missing} worker(s): {exc.message}"
        log.info("schedule %s: %s", item.schedule_id, message)
        _finish(ctx, item, row_id, Status.FAILED, message, now, EventKind.SCHEDULE_FAILED if message != previous else None)
        report.failed.append(item.schedule_id)
        return
    ids = ", ".join(w.id for w in started)
    _finish(
        ctx, item, row_id, Status.DONE, f"{item.why}: started {len(started)} worker(s) ({ids})", now, EventKind.SCHEDULE_STARTED
    )
    report.started.append(item.schedule_id)
    # The tick's clock, moved on by the time spent since it read what was due.
    _stop_if_withdrawn(ctx, app, item, [w.id for w in started], now + timedelta(seconds=time.monotonic() - report.began))


def _stop_if_withdrawn(ctx: PlatformContext, app: Celery, item: Due, worker_ids: list[str], now: datetime) -> None:
    """Workers started for a schedule paused or removed while they started: stopped again. (A
    pause or removal that committed before they did could not have seen them.)"""
    with ctx.session() as session:
        schedule = session.get(Schedule, item.schedule_id)
        withdrawn = schedule is None or schedule.paused
    # A second beat may have closed the window (and found nothing to stop) while this one
    # started workers decided on before the close: they would run until the next window's end.
    closed = item.end is not None and item.end <= now
    if withdrawn or closed:
        log.info(
            "schedule %s was paused, removed or its window closed while its workers started: stopping them", item.schedule_id
        )
        for worker_id in worker_ids:
            lifecycle.stop_worker(ctx, app, item.account_id, worker_id, StopReason.SCHEDULE, source="beat")


def _stop(ctx: PlatformContext, app: Celery, item: Due, row_id: int, now: datetime, report: Report) -> None:
    """Stop every worker of the schedule still wanted; one that could not be told is retried."""
    stopped, problems = _stop_all(ctx, app, item.account_id, item.schedule_id, source="beat")
    what = f"{item.why}: stopped {len(stopped)} worker(s)" + (f" ({', '.join(stopped)})" if stopped else "")
    if problems:
        _finish(ctx, item, row_id, Status.FAILED, f"{what}; not stopped yet: {'; '.join(problems)}", now, None)
        report.failed.append(item.schedule_id)
        return
    _finish(ctx, item, row_id, Status.DONE, what, now, EventKind.SCHEDULE_STOPPED if stopped else None)
    if stopped:
        report.stopped.append(item.schedule_id)


def _stop_all(ctx: PlatformContext, app: Celery, account_id: str, schedule_id: str, source: str) -> tuple[list[str], list[str]]:
    """Ask each of the schedule's wanted workers to stop; the ids stopped, and the problems."""
    with ctx.session() as session:
        ids = [w.id for w in schedules.own_workers(session, schedule_id)]
    stopped, problems = [], []
    for worker_id in ids:
        try:
            lifecycle.stop_worker(ctx, app, account_id, worker_id, StopReason.SCHEDULE, source=source)
            stopped.append(worker_id)
        except CipherpoolError as exc:
            log.warning("schedule %s: worker %s not stopped: %s", schedule_id, worker_id, exc.message)
            problems.append(f"{worker_id}: {exc.message}")
    return stopped, problems


def remove_schedule(ctx: PlatformContext, app: Celery, account_id: str, schedule_id: str) -> list[str]:
    """Delete a schedule and stop its workers at once (not at the next tick: nothing would be
    left to say they are its). Returns the workers stopped. A worker a beat was starting for it
    meanwhile is stopped by that beat (:func:`_stop_if_withdrawn`)."""
    with ctx.session() as session:
        schedule = schedules.delete_schedule(session, get_account(session, account_id), schedule_id)
    stopped, problems = _stop_all(ctx, app, account_id, schedule_id, source="gateway")
    with ctx.session() as session:
        message = f"schedule {schedule_id} removed: stopped {len(stopped)} worker(s)"
        if problems:
            message += f"; not stopped (stop them with `cipherpool worker stop ID`): {'; '.join(problems)}"
        if stopped or problems:
            events.record_for(session, schedule.model_id, EventKind.SCHEDULE_STOPPED, message)
    return stopped
