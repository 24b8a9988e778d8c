"""A provider's credits (bearer API key): balance, purchases, history, usage, reports.

Everything is read for the caller's own account only; an operator's grants, refunds and
adjustments are made where the database is (:class:`cipherpool.admin.Admin`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from cipherpool.api.schemas import NAME_PATTERN, CreditBalance, LedgerLine, PurchaseIn, PurchaseOut, ReportOut, UsageOut
from cipherpool.billing import ledger, payments, views
from cipherpool.billing import usage as billing_usage
from cipherpool.billing.money import to_credits
from cipherpool.clock import utcnow
from cipherpool.errors import InvalidInput
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.services import accounts
from cipherpool.services.models import get_model
from cipherpool.statuses import LedgerKind

router = APIRouter(prefix="/v1/credits", tags=["provider"])


def utc(moment: datetime | None) -> datetime | None:
    """A query time in UTC (naive: taken as UTC): stored times are UTC, and SQLite compares
    them as text, so an offset must be applied, not dropped."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


DEFAULT_WINDOW = timedelta(days=30)
MAX_LINES = 10_000
Since = Annotated[datetime | None, Query(description="ISO 8601; default: 30 days before `until`")]
Until = Annotated[datetime | None, Query(description="ISO 8601; default: now")]
ModelName = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.get("", response_model=CreditBalance)
def balance(gw: Gateway, acct: Account) -> CreditBalance:
    """The balance (the sum of the ledger), the burn rate now and when it runs out at that rate."""
    now = utcnow()
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        burn = billing_usage.burn_rate(session, account.id, now)
        workers = billing_usage.charged_workers(session, account.id)
        return views.balance_out(ledger.balance(session, account.id), burn, workers, gw.settings.credits_low_balance, now)


@router.post("/purchases", response_model=PurchaseOut, status_code=201)
def purchase(body: PurchaseIn, gw: Gateway, acct: Account) -> PurchaseOut:
    """Buy credits through the platform's payment provider (by default an invoice to pay
    offline, credited at once). Send an ``idempotency_key`` to retry safely."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
    bought = payments.purchase(
        gw.ctx.session, gw.settings, account.id, body.amount, idempotency_key=body.idempotency_key, note=body.note
    )
    with gw.ctx.session() as session:
        line = views.lines_out(session, [bought.entry])[0] if bought.entry is not None else None
        return PurchaseOut(
            settled=bought.entry is not None,
            reference=bought.reference,
            invoice=bought.invoice.id,
            status=bought.invoice.status,
            note=bought.note,
            line=line,
            balance=to_credits(ledger.balance(session, account.id)),
        )


@router.get("/history", response_model=list[LedgerLine])
def history(
    gw: Gateway,
    acct: Account,
    since: Since = None,
    until: Until = None,
    kind: Annotated[list[LedgerKind] | None, Query()] = None,
    model: ModelName = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LINES)] = 1000,
) -> list[LedgerLine]:
    """Ledger lines recorded in ``[since, until)``, oldest first; filter by kind (repeat it)
    and model. With ``since``, the first ``limit`` lines from then on; without, the latest
    ``limit``."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        model_id = get_model(session, account, model).id if model else None
        lines = ledger.history(
            session,
            account.id,
            since=utc(since),
            until=utc(until),
            kinds=kind,
            model_id=model_id,
            limit=limit,
            latest=since is None,
        )
        return views.lines_out(session, lines)


@router.get("/usage", response_model=UsageOut)
def usage(gw: Gateway, acct: Account, since: Since = None, until: Until = None, model: ModelName = None) -> UsageOut:
    """Runtime, cost and queries per day, model and worker; the burn rate and when the balance runs out."""
    now = utcnow()
    end = utc(until) or now
    start = utc(since) or end - DEFAULT_WINDOW
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        model_id = get_model(session, account, model).id if model else None
        used = billing_usage.usage(session, gw.store.redis, account.id, start, end, model_id, now)
        return views.usage_out(used, now)


@router.get("/report", response_model=ReportOut)
def report(gw: Gateway, acct: Account, period: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$")]) -> ReportOut:
    """A month's usage report (``period=2026-11``), reconciling to the ledger to the micro-credit."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        try:
            made = billing_usage.report(session, gw.store.redis, account.id, period)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return views.report_out(account.id, made)
