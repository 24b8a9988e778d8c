"""What an account used and paid: per model, worker and day; the burn rate; monthly reports.

Money comes from the ledger alone, so a report reconciles to it to the micro-credit: its
opening balance plus every line recorded in the period is its closing balance, and its rows
add up to the period's charges. Lines belong to the period in which they were recorded
(``at``); a row's day is the day its period ran (periods never cross midnight). Query counts
come from the nodes' daily counters in Redis (:mod:`cipherpool.workers.querycount`) for
dedicated workers, and from the execution lines for shared nodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from redis import Redis
from redis.exceptions import RedisError
from sqlmodel import Session, col, select

from cipherpool.billing import ledger
from cipherpool.billing.money import MS_PER_HOUR, MS_PER_S
from cipherpool.billing.querycounts import SHARED, counts
from cipherpool.billing.rates import prices_at
from cipherpool.clock import aware, utcnow
from cipherpool.db.tables import LedgerEntry, Model, PoolNode, Worker
from cipherpool.errors import InvalidInput
from cipherpool.statuses import CHARGES, HOLDING_NODE, LedgerKind, WorkerStatus

PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
MAX_DAYS = 400  # query counts are read per day: a window longer than this is refused
BURN_WINDOW = timedelta(hours=1)  # shared execution's share of the burn rate: the last hour's


@dataclass
class UsageRow:
    day: date
    model_id: str | None
    model: str | None
    worker_id: str | None  # None: shared nodes
    kind: LedgerKind
    ms: int = 0
    queries: int = 0
    cost: int = 0  # micro-credits charged (positive)


@dataclass
class Usage:
    since: datetime
    until: datetime
    rows: list[UsageRow]
    balance: int
    burn_per_hour: int
    lines: list[LedgerEntry] = field(default_factory=list)

    @property
    def total_cost(self) -> int:
        return sum(r.cost for r in self.rows)

    @property
    def total_ms(self) -> int:
        return sum(r.ms for r in self.rows)

    @property
    def total_queries(self) -> int:
        return sum(r.queries for r in self.rows)

    @property
    def runs_out_in_s(self) -> float | None:
        """Seconds until the balance is spent at the current burn rate (None: it is not burning)."""
        if self.burn_per_hour <= 0:
            return None
        return max(0.0, self.balance / self.burn_per_hour * 3600)


@dataclass
class Report:
    period: str
    usage: Usage
    opening: int
    closing: int
    credits_in: dict[str, int]
    charges: dict[str, int]

    @property
    def reconciles(self) -> bool:
        """Opening + every line of the period == closing, and the rows == the charges."""
        moved = sum(self.credits_in.values()) - sum(self.charges.values())
        return self.opening + moved == self.closing and self.usage.total_cost == sum(self.charges.values())


def usage(
    session: Session,
    redis: Redis | None,
    account_id: str,
    since: datetime,
    until: datetime,
    model_id: str | None = None,
    now: datetime | None = None,
    recorded: list[LedgerEntry] | None = None,
) -> Usage:
    """Runtime, cost and queries per day, model and worker of lines recorded in ``[since, until)``
    (or of ``recorded``, the period's lines a report read already)."""
    since, until = aware(since).astimezone(UTC), aware(until).astimezone(UTC)
    if until <= since:
        raise InvalidInput("until must be after since.")
    if until - since > timedelta(days=MAX_DAYS):
        raise InvalidInput(f"A usage window is at most {MAX_DAYS} days.")
    if recorded is None:
        lines = ledger.history(
            session, account_id, since=since, until=until, kinds=sorted(CHARGES), model_id=model_id, limit=None
        )
    else:
        lines = [line for line in recorded if LedgerKind(line.kind).is_charge]
    names = _model_names(session, {line.model_id for line in lines if line.model_id})
    rows: dict[tuple[date, str | None, str | None, LedgerKind], UsageRow] = {}
    for line in lines:
        day = aware(line.period_start or line.at).date()
        kind = LedgerKind(line.kind)
        row = rows.setdefault(
            (day, line.model_id, line.worker_id, kind),
            UsageRow(day, line.model_id, names.get(line.model_id or ""), line.worker_id, kind),
        )
        row.ms += line.quantity_ms or 0
        row.cost += -line.amount
        if kind == LedgerKind.EXECUTION:
            row.queries += line.queries or 0
    if redis is not None:
        _add_dedicated_queries(session, redis, account_id, rows, since, until, model_id)
    ordered = sorted(rows.values(), key=lambda r: (r.day, r.model or "", r.worker_id or "", r.kind.value))
    return Usage(
        since, until, ordered, ledger.balance(session, account_id), burn_rate(session, account_id, now or utcnow()), lines
    )


def _add_dedicated_queries(
    session: Session,
    redis: Redis,
    account_id: str,
    rows: dict[tuple[date, str | None, str | None, LedgerKind], UsageRow],
    since: datetime,
    until: datetime,
    model_id: str | None,
) -> None:
    """Queries answered by dedicated workers, from the nodes' daily counters, onto the rows
    of their day (days wholly inside the window; the first and last in part)."""
    try:
        found = {day: counts(redis, account_id, day) for day in _days(since, until)}
    except RedisError:
        return  # the figures of money stand without the counts
    names = _model_names(session, {m for day in found.values() for m, _ in day})
    for day, per_worker in found.items():
        for (model, worker), n in per_worker.items():
            if worker == SHARED or (model_id is not None and model != model_id):
                continue  # shared-node queries are on their execution lines
            key = (day, model, worker, LedgerKind.RUNTIME)
            if key not in rows and (day, model, worker, LedgerKind.STANDBY) in rows:
                key = (day, model, worker, LedgerKind.STANDBY)
            row = rows.setdefault(key, UsageRow(day, model, names.get(model), worker, key[3]))
            row.queries += n


def _days(since: datetime, until: datetime) -> Iterable[date]:
    day = since.date()
    while datetime(day.year, day.month, day.day, tzinfo=UTC) < until:
        yield day
        day += timedelta(days=1)


def _model_names(session: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return {m.id: m.name for m in session.exec(select(Model).where(col(Model.id).in_(sorted(ids))))}


def burn_rate(session: Session, account_id: str, now: datetime) -> int:
    """Micro-credits per hour the account spends now: its workers' rates (runtime or standby)
    plus its shared-node execution of the last hour."""
    total = 0
    workers = session.exec(
        select(Worker, PoolNode)
        .join(PoolNode, col(PoolNode.name) == Worker.node_name)
        .where(Worker.account_id == account_id, col(Worker.status).in_(HOLDING_NODE), col(Worker.started_at).is_not(None))
    )
    for worker, node in workers:
        prices = prices_at(session, node.host_class, node.profile, now)
        total += prices.standby_per_hour if worker.status == WorkerStatus.STANDBY else prices.runtime_per_hour
    recent = ledger.history(session, account_id, since=now - BURN_WINDOW, kinds=[LedgerKind.EXECUTION])
    total += -sum(line.amount for line in recent) * MS_PER_HOUR // (BURN_WINDOW // timedelta(milliseconds=1))
    return total


def month(period: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` as its first instant and the next month's (UTC)."""
    found = PERIOD.match(period or "")
    if not found:
        raise InvalidInput(f"A period is a month written YYYY-MM (like 2026-11), not {period!r}.")
    year, number = int(found[1]), int(found[2])
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + (number == 12), number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def report(session: Session, redis: Redis | None, account_id: str, period: str) -> Report:
    """A month's usage for accounting, with the balances it reconciles to."""
    since, until = month(period)
    opening = ledger.balance_before(session, account_id, since)
    # One read of the period's lines for every figure: a tick committing meanwhile cannot
    # make the rows, the charges and the closing balance disagree.
    recorded = ledger.history(session, account_id, since=since, until=until, limit=None)
    used = usage(session, redis, account_id, since, until, recorded=recorded)
    credits_in: dict[str, int] = {}
    charges: dict[str, int] = {}
    for line in recorded:
        kind = LedgerKind(line.kind)
        if kind.is_charge:
            charges[kind.value] = charges.get(kind.value, 0) - line.amount
        else:
            credits_in[kind.value] = credits_in.get(kind.value, 0) + line.amount
    return Report(period, used, opening, opening + sum(line.amount for line in recorded), credits_in, charges)


def seconds(ms: int) -> float:
    return ms / MS_PER_S


def charged_workers(session: Session, account_id: str) -> int:
    """Workers of the account that hold a node and have started: what is charged now."""
    return len(
        session.exec(
            select(Worker.id).where(
                Worker.account_id == account_id, col(Worker.status).in_(HOLDING_NODE), col(Worker.started_at).is_not(None)
            )
        ).all()
    )
