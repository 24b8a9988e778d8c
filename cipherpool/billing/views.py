"""The billing figures as the API shows them (:mod:`cipherpool.api.schemas`): credits as
exact decimals, seconds from milliseconds, model names beside ids."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from sqlmodel import Session, col, select

from cipherpool.api.schemas import CreditBalance, LedgerLine, ReportOut, UsageOut, UsageRow
from cipherpool.billing.money import MS_PER_S, to_credits, to_micro
from cipherpool.billing.usage import Report, Usage
from cipherpool.clock import aware
from cipherpool.db.tables import LedgerEntry, Model
from cipherpool.statuses import LedgerKind


def seconds(ms: int | None) -> Decimal | None:
    return None if ms is None else Decimal(ms) / MS_PER_S


def line_out(line: LedgerEntry, names: dict[str, str]) -> LedgerLine:
    rate = None if line.rate is None else to_credits(line.rate)  # per hour; per second for execution
    return LedgerLine(
        id=line.public_id,
        at=aware(line.at).isoformat(),
        kind=LedgerKind(line.kind),
        amount=to_credits(line.amount),
        balance_after=to_credits(line.balance_after),
        model=names.get(line.model_id or ""),
        model_id=line.model_id,
        worker_id=line.worker_id,
        node=line.node,
        period_start=aware(line.period_start).isoformat() if line.period_start else None,
        period_end=aware(line.period_end).isoformat() if line.period_end else None,
        seconds=seconds(line.quantity_ms),
        queries=line.queries,
        rate=rate,
        reference=line.reference,
        note=line.note,
    )


def lines_out(session: Session, lines: list[LedgerEntry]) -> list[LedgerLine]:
    ids = sorted({line.model_id for line in lines if line.model_id})
    names = {m.id: m.name for m in session.exec(select(Model).where(col(Model.id).in_(ids)))} if ids else {}
    return [line_out(line, names) for line in lines]


def _runs_out(used: Usage, now: datetime) -> tuple[float | None, str | None]:
    left = used.runs_out_in_s
    return left, (now + timedelta(seconds=left)).isoformat() if left is not None else None


def balance_out(balance: int, burn_per_hour: int, workers: int, threshold: Decimal, now: datetime) -> CreditBalance:
    left = max(0.0, balance / burn_per_hour * 3600) if burn_per_hour > 0 else None
    at = (now + timedelta(seconds=left)).isoformat() if left is not None else None
    return CreditBalance(
        balance=to_credits(balance),
        low_balance_threshold=threshold,
        low=balance < to_micro(threshold),
        burn_rate_per_hour=to_credits(burn_per_hour),
        runs_out_in_s=left,
        runs_out_at=at,
        workers_charged=workers,
    )


def rows_out(used: Usage) -> list[UsageRow]:
    return [
        UsageRow(
            day=r.day.isoformat(),
            model=r.model,
            model_id=r.model_id,
            worker_id=r.worker_id,
            kind=r.kind,
            seconds=Decimal(r.ms) / MS_PER_S,
            queries=r.queries,
            cost=to_credits(r.cost),
        )
        for r in used.rows
    ]


def usage_out(used: Usage, now: datetime) -> UsageOut:
    left, at = _runs_out(used, now)
    return UsageOut(
        since=used.since.isoformat(),
        until=used.until.isoformat(),
        rows=rows_out(used),
        total_seconds=Decimal(used.total_ms) / MS_PER_S,
        total_queries=used.total_queries,
        total_cost=to_credits(used.total_cost),
        balance=to_credits(used.balance),
        burn_rate_per_hour=to_credits(used.burn_per_hour),
        runs_out_in_s=left,
        runs_out_at=at,
    )


def report_out(account_id: str, made: Report) -> ReportOut:
    used = made.usage
    return ReportOut(
        period=made.period,
        account_id=account_id,
        since=used.since.isoformat(),
        until=used.until.isoformat(),
        opening_balance=to_credits(made.opening),
        credits_in={k: to_credits(v) for k, v in sorted(made.credits_in.items())},
        charges={k: to_credits(v) for k, v in sorted(made.charges.items())},
        closing_balance=to_credits(made.closing),
        rows=rows_out(used),
        total_seconds=Decimal(used.total_ms) / MS_PER_S,
        total_queries=used.total_queries,
        total_cost=to_credits(used.total_cost),
        reconciles=made.reconciles,
    )
