"""Provider endpoints for worker schedules (bearer API key): create, list, show, pause, resume,
remove. Beat applies them (:mod:`cipherpool.scheduler.tick`); nothing here starts a worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from sqlmodel import Session

from cipherpool.api.schemas import ID_PATTERN, NAME_PATTERN, ScheduleIn, ScheduleOut
from cipherpool.db.tables import Account as AccountRow
from cipherpool.db.tables import Schedule
from cipherpool.gateway.auth import AccountPrincipal
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.scheduler import schedules
from cipherpool.scheduler.tick import remove_schedule
from cipherpool.services import accounts

router = APIRouter(prefix="/v1/schedules", tags=["provider"])
ScheduleId = Annotated[str, Path(pattern=ID_PATTERN)]
ModelFilter = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.post("", response_model=ScheduleOut, status_code=201)
def create_schedule(body: ScheduleIn, gw: Gateway, acct: Account) -> ScheduleOut:
    """Recurring windows (``start_cron``/``stop_cron`` in ``timezone``) or a reservation
    (``starts_at``/``ends_at``) in which the model keeps ``workers`` of the schedule's own."""
    return _change(
        gw,
        acct,
        lambda s, a: schedules.create_schedule(
            s,
            a,
            body.model,
            start_cron=body.start_cron,
            stop_cron=body.stop_cron,
            timezone=body.timezone,
            starts_at=body.starts_at,
            ends_at=body.ends_at,
            workers=body.workers,
            profile=body.profile,
            name=body.name,
        ),
    )


@router.get("", response_model=list[ScheduleOut])
def list_schedules(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[ScheduleOut]:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [schedules.describe(session, s) for s in schedules.list_schedules(session, account, model)]


@router.get("/{schedule_id}", response_model=ScheduleOut)
def get_schedule(schedule_id: ScheduleId, gw: Gateway, acct: Account) -> ScheduleOut:
    """The schedule, the window open now, its next start and stop, workers and last actions."""
    return _change(gw, acct, lambda s, a: schedules.get_schedule(s, a, schedule_id))


@router.post("/{schedule_id}/pause", response_model=ScheduleOut)
def pause_schedule(schedule_id: ScheduleId, gw: Gateway, acct: Account) -> ScheduleOut:
    """Start nothing more; beat stops the schedule's workers on its next tick."""
    return _change(gw, acct, lambda s, a: schedules.set_paused(s, a, schedule_id, True))


@router.post("/{schedule_id}/resume", response_model=ScheduleOut)
def resume_schedule(schedule_id: ScheduleId, gw: Gateway, acct: Account) -> ScheduleOut:
    """Apply the schedule again: a window open now starts on beat's next tick."""
    return _change(gw, acct, lambda s, a: schedules.set_paused(s, a, schedule_id, False))


@router.delete("/{schedule_id}", status_code=204)
def delete_schedule(schedule_id: ScheduleId, gw: Gateway, acct: Account) -> Response:
    """Remove the schedule, its actions, and stop its workers now."""
    remove_schedule(gw.ctx, gw.celery, acct.account_id, schedule_id)
    return Response(status_code=204)


def _change(gw: GatewayState, acct: AccountPrincipal, change: Callable[[Session, AccountRow], Schedule]) -> ScheduleOut:
    """Run ``change`` for the caller's (enabled) account; the schedule as it is after it."""
    with gw.ctx.session() as session:
        schedule = change(session, accounts.get_account(session, acct.account_id))
        session.flush()
        return schedules.describe(session, schedule)
