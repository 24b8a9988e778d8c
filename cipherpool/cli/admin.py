"""`cipherpool admin`: operator commands that run where the database is."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.credits import AMOUNT, FORMATS, NUMBERS_AS_ARGUMENTS, OPERATOR_KINDS, operator_grant, operator_history
from cipherpool.cli.durations import MOMENT
from cipherpool.statuses import LedgerKind

ACCOUNT_COLUMNS = ["id", "name", "organisation", "contact_email", "status", "api_key_prefix", "created_at"]


@click.group()
def admin() -> None:
    """Operator commands (need database access)."""


@admin.group()
def account() -> None:
    """Provider accounts."""


@account.command("create")
@click.argument("name")
@click.option("--organisation", help="The provider's organisation.")
@click.option("--email", "contact_email", help="Whom to contact about the account.")
@click.option(
    "--create-database",
    is_flag=True,
    help="Create the platform database if there is none at the data dir (or CIPHERPOOL_DATABASE_URL).",
)
@pass_ctx
def account_create(
    ctx: CliContext, name: str, organisation: str | None, contact_email: str | None, create_database: bool
) -> None:
    """Create an account and print its API key (shown once, stored only as a hash). The
    database must exist (`cipherpool up` or `cipherpool db upgrade` makes it), unless
    --create-database."""
    admin = ctx.admin(create_database=create_database)
    created = admin.create_account(name, organisation=organisation or None, contact_email=contact_email or None)
    ctx.emit(
        {
            "account": created.name,
            **created.model_dump(mode="json"),
            "database": ctx.database,
            "note": "API key shown once; hand it over now",
        }
    )


@account.command("list")
@pass_ctx
def account_list(ctx: CliContext) -> None:
    """Every provider account."""
    ctx.emit(ctx.admin().list_accounts(), ACCOUNT_COLUMNS)


@account.command("show")
@click.argument("id_or_name")
@pass_ctx
def account_show(ctx: CliContext, id_or_name: str) -> None:
    """One account, by id or name."""
    ctx.emit(ctx.admin().get_account(id_or_name))


@account.command("disable")
@click.argument("id_or_name")
@pass_ctx
def account_disable(ctx: CliContext, id_or_name: str) -> None:
    """Refuse the account's API key and tokens now and stop its workers; nothing is deleted."""
    disabled = ctx.admin().disable_account(id_or_name)
    if ctx.as_json:
        ctx.emit({"account": disabled.account.model_dump(mode="json"), "workers_stopped": disabled.workers_stopped})
        return
    ctx.emit(disabled.account)
    ctx.emit({"workers_stopped": disabled.workers_stopped})


@account.command("enable")
@click.argument("id_or_name")
@pass_ctx
def account_enable(ctx: CliContext, id_or_name: str) -> None:
    """Accept the account's API key and tokens again (its workers are started by the provider)."""
    ctx.emit(ctx.admin().enable_account(id_or_name))


@admin.group("credits")
def credits_() -> None:
    """Accounts' credits: grants, refunds, adjustments and the ledger (no payment involved)."""


@credits_.command("grant", context_settings=NUMBERS_AS_ARGUMENTS)
@click.argument("account")
@click.argument("amount", type=AMOUNT)
@click.option(
    "--kind",
    type=click.Choice(OPERATOR_KINDS),
    default=LedgerKind.GRANT.value,
    show_default=True,
    help="A grant or refund (positive), or an adjustment (either sign: `-- -5` for a negative one).",
)
@click.option("--note", default="", help="Why: shown on the account's ledger line.")
@click.option("--idempotency-key", "key", help="Retry safely: a second grant with this key adds nothing twice.")
@pass_ctx
def credits_grant(ctx: CliContext, account: str, amount: Decimal, kind: str, note: str, key: str | None) -> None:
    """Add AMOUNT credits to ACCOUNT (id or name); the same as `credits add --account`."""
    operator_grant(ctx, account, amount, kind, note, key)


@credits_.command("history")
@click.argument("account")
@click.option("--since", type=MOMENT, help="Lines at or after this time (2026-11-01 or an ISO time).")
@click.option("--until", type=MOMENT, help="Lines before this time.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([k.value for k in LedgerKind]),
    help="Only lines of this kind (repeat for several).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(FORMATS)),
    default=None,
    help="Output format (default table); --json is --format json.",
)
@pass_ctx
def credits_history(
    ctx: CliContext, account: str, since: datetime | None, until: datetime | None, kinds: tuple[str, ...], fmt: str | None
) -> None:
    """ACCOUNT's ledger lines, oldest first, with its balance after each."""
    operator_history(ctx, account, since, until, kinds, fmt)


@credits_.command("settle")
@click.argument("invoice")
@click.option(
    "--status",
    type=click.Choice(["paid", "open"]),
    default="paid",
    show_default=True,
    help="paid: the payment cleared; open: an invoice accepted, to be paid later.",
)
@pass_ctx
def credits_settle(ctx: CliContext, invoice: str, status: str) -> None:
    """Credit a pending purchase (INV-...) whose payment cleared; a second time adds nothing."""
    ctx.emit(ctx.admin().settle_purchase(invoice, status))
