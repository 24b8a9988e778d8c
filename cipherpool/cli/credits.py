"""`cipherpool credits`: the balance, buying credits, the ledger, usage and monthly reports.

Amounts are credits, exact to the micro-credit (six decimals); they are read and written as
decimal text, never as binary floats. ``--format json`` (or ``--json``) prints the API's own
answer; ``csv`` is for spreadsheets and accountants. The operator's side (a grant, a refund,
an adjustment) is ``credits add --account`` or ``cipherpool admin credits grant``: the same
code, with database access instead of an API key.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from cipherpool.api.schemas import LedgerLine, ReportOut, UsageOut, UsageRow
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import MOMENT
from cipherpool.errors import InvalidInput
from cipherpool.files import FILE_MODE
from cipherpool.statuses import LedgerKind

FORMATS = ("table", "csv", "json")
OPERATOR_KINDS = (LedgerKind.GRANT.value, LedgerKind.REFUND.value, LedgerKind.ADJUSTMENT.value)
LINE_COLUMNS = ["id", "at", "kind", "amount", "balance_after", "model", "worker_id", "seconds", "queries", "reference", "note"]
CSV_LINE_FIELDS = list(LedgerLine.model_fields)
USAGE_COLUMNS = ["day", "model", "worker", "kind", "seconds", "queries", "cost"]
# The report's CSV header (usage's has no period): usage rows carry ``cost`` (the column sums
# to the total cost); summary records carry their figure in ``amount`` (signed as on the
# ledger: credits in positive, charges negative, so opening + credits in + charges = closing).
CSV_COLUMNS = ["period", "record", "day", "model", "model_id", "worker", "kind", "seconds", "queries", "cost", "amount"]
SHARED = "shared"  # the worker column of shared-node execution


class Amount(click.ParamType[Decimal, Any]):
    """A number of credits as typed: exact decimal text (``12.5``, ``-3`` for an adjustment)."""

    name = "credits"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(f"{value!r} is not a number of credits (like 50 or 12.5)", param, ctx)
        if not amount.is_finite():
            self.fail(f"{value!r} is not a number of credits (like 50 or 12.5)", param, ctx)
        return amount


AMOUNT = Amount()
# A negative AMOUNT (an adjustment) reads as an option without this.
NUMBERS_AS_ARGUMENTS = {"ignore_unknown_options": True}


def fmt_credits(value: Decimal | str | None) -> str:
    """For a person: credits without trailing zeros (``150``, ``0.000001``, ``-3.5``)."""
    if value is None:
        return "-"
    text = format(Decimal(value), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def exact(value: Decimal | None) -> str:
    """For a file: the exact decimal, as the API gives it (``150.000000``)."""
    return "" if value is None else format(value, "f")


def human_duration(seconds: float | None) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``12 min``, ``40 s``; ``never`` when nothing burns."""
    if seconds is None:
        return "never (nothing is being charged)"
    left = int(seconds)
    days, rest = divmod(left, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def output_format(ctx: CliContext, given: str | None) -> str:
    """``--format``, with ``--json`` (global or the command's own) meaning ``--format json``."""
    if ctx.as_json:
        if given not in (None, "json"):
            raise click.UsageError(f"--json and --format {given} disagree: give one of them.")
        return "json"
    return given or "table"


def format_option(choices: Sequence[str] = FORMATS, default: str = "table") -> Callable[[Any], Any]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(list(choices)),
        default=None,
        help=f"Output format (default {default}); --json is --format json.",
    )


def utc(moment: datetime | None) -> datetime | None:
    """A moment as UTC (the ledger's times are UTC; ``2026-11-01`` is its UTC midnight)."""
    return None if moment is None else moment.astimezone(UTC)


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 from the first byte (a report names what an
    account spent). Unlike :func:`cipherpool.files.write_private`, the directory a person
    chose is left as it is (that helper makes it 0700)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except OSError as exc:
        raise click.FileError(str(path), hint=exc.strerror or str(exc)) from None
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a file that was there before keeps its mode otherwise
        f.write(text)


def to_csv(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


# ---- ledger lines --------------------------------------------------------------------------


def emit_lines(ctx: CliContext, lines: list[LedgerLine], fmt: str) -> None:
    """Ledger lines as a table, CSV (every field, exact amounts) or JSON (the API's form)."""
    if fmt == "json":
        ctx.as_json = True
        ctx.emit(lines)
    elif fmt == "csv":
        rows = [{k: "" if v is None else v for k, v in line.model_dump(mode="json").items()} for line in lines]
        click.echo(to_csv(CSV_LINE_FIELDS, rows), nl=False)
    elif not lines:
        click.echo("No ledger lines.")
    else:
        ctx.emit([_line_row(line) for line in lines], LINE_COLUMNS)


def _line_row(line: LedgerLine) -> dict[str, Any]:
    row = line.model_dump(mode="json")
    row.update(
        amount=fmt_credits(line.amount),
        balance_after=fmt_credits(line.balance_after),
        seconds=None if line.seconds is None else fmt_credits(line.seconds),
        note=line.note or None,
    )
    return row


def operator_grant(ctx: CliContext, account: str, amount: Decimal, kind: str, note: str, key: str | None) -> None:
    """An operator's grant, refund or adjustment, written where the database is (no API key)."""
    admin = ctx.admin()
    line = admin.grant_credits(account, amount, kind=LedgerKind(kind), note=note, key=key)
    if line.amount != amount:  # the key's first line, for another amount: nothing was added now
        raise InvalidInput(
            f"Idempotency key {key!r} was used for a {kind} of {fmt_credits(line.amount)} credits "
            f"(line {line.id}); nothing was added. Use a new key for another {kind}."
        )
    balance = admin.credit_balance(account)
    if ctx.as_json:
        ctx.emit({"account": account, "line": line.model_dump(mode="json"), "balance": str(balance)})
        return
    ctx.emit(
        {
            "account": account,
            "kind": line.kind.value,
            "amount": fmt_credits(line.amount),
            "line": line.id,
            "at": line.at,
            "note": line.note,
            "balance": f"{fmt_credits(balance)} credits",
        }
    )


def operator_history(
    ctx: CliContext, account: str, since: datetime | None, until: datetime | None, kinds: Sequence[str], fmt: str | None
) -> None:
    """An account's ledger lines, read where the database is (the operator's `credits history`)."""
    lines = ctx.admin().credit_history(account, since=utc(since), until=utc(until), kinds=[LedgerKind(k) for k in kinds] or None)
    emit_lines(ctx, lines, output_format(ctx, fmt))


# ---- usage and reports -------------------------------------------------------------------


def _usage_record(row: UsageRow, period: str = "") -> dict[str, Any]:
    return {
        "period": period,
        "record": "usage",
        "day": row.day,
        "model": row.model or "",
        "model_id": row.model_id or "",
        "worker": row.worker_id or SHARED,
        "kind": row.kind.value,
        "seconds": exact(row.seconds),
        "queries": row.queries,
        "cost": exact(row.cost),
        "amount": "",
    }


def usage_csv(used: UsageOut) -> str:
    """The usage rows, then the totals, the balance, the burn rate and when it runs out."""
    summary: list[dict[str, Any]] = [
        {
            "record": "total",
            "seconds": exact(used.total_seconds),
            "queries": used.total_queries,
            "amount": exact(used.total_cost),
        },
        {"record": "balance", "amount": exact(used.balance)},
        {"record": "burn rate per hour", "amount": exact(used.burn_rate_per_hour)},
        {"record": "runs out at", "amount": used.runs_out_at or "never"},
    ]
    return to_csv(CSV_COLUMNS[1:], [*(_usage_record(r) for r in used.rows), *summary])  # no period: a window


def report_csv(report: ReportOut) -> str:
    """One row per usage row (its ``cost`` column sums to the total cost), then the summary an
    accountant checks: opening balance, credits in and charges per kind (signed as on the
    ledger), closing balance, and whether opening + lines == closing."""
    period = report.period
    last_day = datetime.fromisoformat(report.until).date() - timedelta(days=1)  # the balance at its end
    summary: list[dict[str, Any]] = [
        {
            "record": "total",
            "seconds": exact(report.total_seconds),
            "queries": report.total_queries,
            "amount": exact(report.total_cost),
        },
        {"record": "opening balance", "day": report.since[:10], "amount": exact(report.opening_balance)},
        *({"record": "credits in", "kind": kind, "amount": exact(amount)} for kind, amount in report.credits_in.items()),
        *({"record": "charges", "kind": kind, "amount": exact(-amount)} for kind, amount in report.charges.items()),
        {"record": "closing balance", "day": last_day.isoformat(), "amount": exact(report.closing_balance)},
        {"record": "reconciles", "amount": "yes" if report.reconciles else "NO"},
    ]
    return to_csv(
        CSV_COLUMNS, [*(_usage_record(r, period) for r in report.rows), *({"period": period, **line} for line in summary)]
    )


def _usage_table(ctx: CliContext, rows: list[UsageRow]) -> None:
    if not rows:
        click.echo("No usage in this window.")
        return
    ctx.emit(
        [
            {
                "day": r.day,
                "model": r.model,
                "worker": r.worker_id or SHARED,
                "kind": r.kind.value,
                "seconds": fmt_credits(r.seconds),
                "queries": r.queries,
                "cost": fmt_credits(r.cost),
            }
            for r in rows
        ],
        USAGE_COLUMNS,
    )


# ---- the commands --------------------------------------------------------------------------


@click.group("credits")
def credits_() -> None:
    """Credits: the balance, buying more, the ledger, usage and monthly reports."""


@credits_.command("balance")
@pass_ctx
def balance(ctx: CliContext) -> None:
    """The balance, whether it is low, the burn rate and when it runs out at that rate."""
    found = ctx.management().credits()
    if ctx.as_json:
        ctx.emit(found)
        return
    ctx.emit(
        {
            "balance": f"{fmt_credits(found.balance)} credits",
            "low": f"yes (below {fmt_credits(found.low_balance_threshold)})" if found.low else "no",
            "burn rate": f"{fmt_credits(found.burn_rate_per_hour)} credits/h",
            "workers charged": found.workers_charged,
            "runs out in": human_duration(found.runs_out_in_s),
            "runs out at": found.runs_out_at,
        }
    )


@credits_.command("add", context_settings=NUMBERS_AS_ARGUMENTS)
@click.argument("amount", type=AMOUNT)
@click.option("--note", default="", help="A note on the ledger line (and the invoice).")
@click.option("--idempotency-key", "key", help="Retry safely: a second add with this key credits nothing twice.")
@click.option("--account", help="Operator: add to this account (id or name) with database access, no payment.")
@click.option(
    "--kind",
    type=click.Choice(OPERATOR_KINDS),
    help="Operator (with --account): grant (default), refund or adjustment (which may be negative).",
)
@pass_ctx
def add(ctx: CliContext, amount: Decimal, note: str, key: str | None, account: str | None, kind: str | None) -> None:
    """Buy AMOUNT credits through the platform's payment provider (by default an invoice to be
    paid offline, credited at once). With --account, an operator's grant instead."""
    if account:
        operator_grant(ctx, account, amount, kind or LedgerKind.GRANT.value, note, key)
        return
    if kind:
        raise click.UsageError("--kind is for an operator's grant: give --account too.")
    bought = ctx.management().buy_credits(amount, idempotency_key=key, note=note)
    if ctx.as_json:
        ctx.emit(bought)
        return
    ctx.emit(
        {
            "settled": "yes" if bought.settled else "no (credited once the payment clears)",
            "amount": fmt_credits(bought.line.amount if bought.line else amount),
            "reference": bought.reference,
            "note": bought.note,
            "balance": f"{fmt_credits(bought.balance)} credits",
        }
    )


@credits_.command("history")
@click.option("--since", type=MOMENT, help="Lines at or after this time (2026-11-01 or an ISO time; UTC unless an offset).")
@click.option("--until", type=MOMENT, help="Lines before this time.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([k.value for k in LedgerKind]),
    help="Only lines of this kind (repeat for several).",
)
@click.option("--model", help="Only this model's lines.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="At most this many lines.")
@format_option()
@pass_ctx
def history(
    ctx: CliContext,
    since: datetime | None,
    until: datetime | None,
    kinds: tuple[str, ...],
    model: str | None,
    limit: int,
    fmt: str | None,
) -> None:
    """The ledger, oldest first: every credit and charge, with the balance after it."""
    fmt = output_format(ctx, fmt)
    lines = ctx.management().credit_history(since=since, until=until, kinds=kinds, model=model, limit=limit)
    emit_lines(ctx, lines, fmt)


@credits_.command("usage")
@click.option("--since", type=MOMENT, help="From this time (default: 30 days before --until).")
@click.option("--until", type=MOMENT, help="Until this time (default: now).")
@click.option("--model", help="Only this model.")
@format_option()
@pass_ctx
def usage(ctx: CliContext, since: datetime | None, until: datetime | None, model: str | None, fmt: str | None) -> None:
    """Runtime, queries and cost per day, model, worker and kind; the totals, the burn rate and
    how long the balance lasts at that rate."""
    fmt = output_format(ctx, fmt)
    used = ctx.management().credit_usage(since=since, until=until, model=model)
    if fmt == "json":
        ctx.emit(used)
        return
    if fmt == "csv":
        click.echo(usage_csv(used), nl=False)
        return
    _usage_table(ctx, used.rows)
    click.echo("")
    ctx.emit(
        {
            "window": f"{used.since} .. {used.until}",
            "total": f"{fmt_credits(used.total_cost)} credits, {fmt_credits(used.total_seconds)} s, {used.total_queries} queries",
            "balance": f"{fmt_credits(used.balance)} credits",
            "burn rate": f"{fmt_credits(used.burn_rate_per_hour)} credits/h",
            "runs out in": human_duration(used.runs_out_in_s),
            "runs out at": used.runs_out_at,
        }
    )


@credits_.command("report")
@click.option("--period", required=True, help="The month, YYYY-MM (like 2026-11).")
@format_option(("csv", "json"), default="csv")
@click.option(
    "--output",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (mode 0600) instead of printing.",
)
@pass_ctx
def report(ctx: CliContext, period: str, fmt: str | None, output_path: Path | None) -> None:
    """A month's usage report for accounting: one CSV row per day, model, worker and kind, then
    the opening balance, credits in and charges per kind, the closing balance and whether it
    reconciles to the ledger. JSON: the API's report."""
    fmt = output_format(ctx, fmt or ("json" if ctx.as_json else "csv"))
    made = ctx.management().credit_report(period)
    text = made.model_dump_json(indent=2) + "\n" if fmt == "json" else report_csv(made)
    if output_path is None:
        click.echo(text, nl=False)
        return
    write_private_file(output_path, text)
    click.echo(
        f"Wrote the {period} report ({len(made.rows)} usage rows, "
        f"{'reconciles' if made.reconciles else 'DOES NOT reconcile'}) to {output_path}",
        err=True,
    )
