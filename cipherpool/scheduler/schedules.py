"""Worker schedules of a provider's models: create, list, show, pause, resume, remove, and what
a listing shows (the window open now, the next start and stop, the last actions).

Plain functions over a session; the caller owns the transaction (as in
:mod:`cipherpool.services`). Beat applies the schedules (:mod:`cipherpool.scheduler.tick`);
removing one also stops its workers, which needs the broker, so the gateway calls
:func:`cipherpool.scheduler.tick.remove_schedule` rather than :func:`delete_schedule` alone.

A schedule's ``updated_at`` is when it last changed state (created, paused, resumed): its
windows apply from then on. A window open at that moment counts from it, so a schedule created
or resumed in the middle of a window starts its workers at once, and a window that closed
before it is none of its business.
"""

from __future__ import annotations

import re
from datetime import datetime

from sqlmodel import Session, col, delete, func, select

from cipherpool.api.schemas import PROFILE_PATTERN, ScheduleActionOut, ScheduleOut
from cipherpool.clock import utcnow
from cipherpool.db.tables import Account, Model, Schedule, ScheduleAction, Worker
from cipherpool.errors import Conflict, InvalidInput, ScheduleNotFound
from cipherpool.scheduler import windows
from cipherpool.scheduler.windows import utc
from cipherpool.services.models import get_model
from cipherpool.services.validation import check_name
from cipherpool.services.workers import MAX_START
from cipherpool.statuses import WANTED, ScheduleActionStatus, ScheduleKind

MAX_SCHEDULES = 100  # per account: beat evaluates every schedule on each tick
LAST_ACTIONS = 5  # shown by a listing


def create_schedule(
    session: Session,
    account: Account,
    model_name: str,
    *,
    start_cron: str | None = None,
    stop_cron: str | None = None,
    timezone: str = "UTC",
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    workers: int = 1,
    profile: str | None = None,
    name: str | None = None,
    now: datetime | None = None,
) -> Schedule:
    """A recurring schedule (``start_cron`` and ``stop_cron`` in ``timezone``) or a reservation
    (``starts_at`` to ``ends_at``, naive times taken as UTC) of ``workers`` workers of the model;
    refused, saying what to change, when it could never run as asked."""
    model = get_model(session, account, model_name)
    now = utc(now or utcnow())
    kind = _kind(start_cron, stop_cron, starts_at, ends_at)
    _check_workers(model, workers)
    if profile is not None and not re.fullmatch(PROFILE_PATTERN, profile):
        raise InvalidInput(f"Invalid profile {profile!r}: lower-case letters, digits, '_' and '-'.")
    schedule = Schedule(
        account_id=account.id,
        model_id=model.id,
        name=check_name("schedule", name) if name else "",
        kind=kind.value,
        timezone=timezone,
        workers=workers,
        profile=profile,
        created_at=now,
        updated_at=now,
    )
    if kind == ScheduleKind.CRON:
        schedule.start_cron = windows.check_cron(start_cron or "", "start cron expression")
        schedule.stop_cron = windows.check_cron(stop_cron or "", "stop cron expression")
    else:
        assert starts_at is not None and ends_at is not None  # _kind made sure
        schedule.starts_at, schedule.ends_at = utc(starts_at), utc(ends_at)
        if schedule.ends_at <= now:
            raise InvalidInput(
                f"The reservation ends at {schedule.ends_at.isoformat()}, which is past: give an ends_at in the future."
            )
    windows.check(schedule)
    _check_room(session, account)
    session.add(schedule)
    session.flush()
    return schedule


def _kind(start_cron: str | None, stop_cron: str | None, starts_at: datetime | None, ends_at: datetime | None) -> ScheduleKind:
    recurring, once = (start_cron, stop_cron), (starts_at, ends_at)
    if any(x is not None for x in recurring) and any(x is not None for x in once):
        raise InvalidInput(
            "Give start_cron and stop_cron (recurring windows) or starts_at and ends_at (a reservation), not both."
        )
    if all(x is not None for x in recurring):
        return ScheduleKind.CRON
    if all(x is not None for x in once):
        return ScheduleKind.ONCE
    raise InvalidInput(
        "A schedule needs start_cron and stop_cron (recurring windows, e.g. '0 8 * * 1-5' and "
        "'0 20 * * 1-5'), or starts_at and ends_at (a reservation)."
    )


def _check_workers(model: Model, workers: int) -> None:
    high = min(model.max_workers, MAX_START)
    if not isinstance(workers, int) or not 1 <= workers <= high:
        raise InvalidInput(
            f"A schedule of model {model.name!r} may keep 1 to {high} worker(s) (its max_workers), not "
            f"{workers}: ask for fewer, or raise max_workers first (`cipherpool model update "
            f"{model.name} --max-workers N`)."
        )


def _check_room(session: Session, account: Account) -> None:
    count = session.exec(select(func.count()).select_from(Schedule).where(Schedule.account_id == account.id)).one()
    if count >= MAX_SCHEDULES:
        raise Conflict(
            f"This account has {count} schedules, the most it may have: remove one first (`cipherpool schedule remove ID`)."
        )


def get_schedule(session: Session, account: Account, schedule_id: str) -> Schedule:
    """The account's schedule; ScheduleNotFound for another account's too (it learns nothing)."""
    schedule = session.get(Schedule, schedule_id)
    if schedule is None or schedule.account_id != account.id:
        raise ScheduleNotFound(f"No schedule {schedule_id!r} in this account.")
    return schedule


def list_schedules(session: Session, account: Account, model_name: str | None = None) -> list[Schedule]:
    query = select(Schedule).where(Schedule.account_id == account.id)
    if model_name:
        query = query.where(Schedule.model_id == get_model(session, account, model_name).id)
    return list(session.exec(query.order_by(col(Schedule.created_at), col(Schedule.id))))


def set_paused(session: Session, account: Account, schedule_id: str, paused: bool, now: datetime | None = None) -> Schedule:
    """Pause (beat stops the schedule's workers on its next tick and starts none) or resume (a
    window open now starts at once). Pausing a paused schedule changes nothing."""
    schedule = get_schedule(session, account, schedule_id)
    if schedule.paused != paused:
        schedule.paused = paused
        schedule.updated_at = utc(now or utcnow())
        session.add(schedule)
    return schedule


def delete_schedule(session: Session, account: Account, schedule_id: str) -> Schedule:
    """Delete the schedule and its actions; its workers are the caller's to stop. The row is
    locked first: a beat claiming an action of it meanwhile is refused (the action's foreign
    key), rather than this delete failing on the action it added."""
    schedule = get_schedule(session, account, schedule_id)
    session.exec(select(Schedule).where(Schedule.id == schedule.id).with_for_update()).one()
    session.exec(delete(ScheduleAction).where(col(ScheduleAction.schedule_id) == schedule.id))
    session.delete(schedule)
    session.flush()
    return schedule


def own_workers(session: Session, schedule_id: str) -> list[Worker]:
    """The schedule's workers that are starting, up or on standby (not stopping or ended)."""
    return list(
        session.exec(
            select(Worker)
            .where(Worker.schedule_id == schedule_id, col(Worker.status).in_(WANTED))
            .order_by(col(Worker.created_at))
        )
    )


def last_actions(session: Session, schedule_id: str, limit: int = LAST_ACTIONS) -> list[ScheduleAction]:
    return list(
        session.exec(
            select(ScheduleAction)
            .where(ScheduleAction.schedule_id == schedule_id)
            .order_by(col(ScheduleAction.at).desc(), col(ScheduleAction.id).desc())
            .limit(limit)
        )
    )


def describe(session: Session, schedule: Schedule, now: datetime | None = None) -> ScheduleOut:
    """The schedule as its provider sees it: its definition, the window open now, the next
    start and stop (none while paused), its running workers and its last actions."""
    now = utc(now or utcnow())
    model = session.get(Model, schedule.model_id)
    current = windows.evaluate(schedule, now).open
    coming = [] if schedule.paused else windows.next_transitions(schedule, now, 2)
    return ScheduleOut(
        id=schedule.id,
        name=schedule.name,
        model=model.name if model else "",
        kind=ScheduleKind(schedule.kind),
        start_cron=schedule.start_cron,
        stop_cron=schedule.stop_cron,
        timezone=schedule.timezone,
        starts_at=_iso(schedule.starts_at),
        ends_at=_iso(schedule.ends_at),
        workers=schedule.workers,
        profile=schedule.profile,
        paused=schedule.paused,
        created_at=utc(schedule.created_at).isoformat(),
        updated_at=utc(schedule.updated_at).isoformat(),
        window_start=_iso(current.start if current else None),
        window_end=_iso(current.end if current else None),
        next_start=next((t.at.isoformat() for t in coming if t.action == "start"), None),
        next_stop=next((t.at.isoformat() for t in coming if t.action == "stop"), None),
        running_workers=len(own_workers(session, schedule.id)),
        last_actions=[describe_action(a) for a in last_actions(session, schedule.id)],
    )


def describe_action(action: ScheduleAction) -> ScheduleActionOut:
    return ScheduleActionOut(
        window_start=utc(action.window_start).isoformat(),
        action=action.action,
        status=ScheduleActionStatus(action.status),
        attempts=action.attempts,
        at=utc(action.at).isoformat(),
        message=action.message,
    )


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else utc(moment).isoformat()
