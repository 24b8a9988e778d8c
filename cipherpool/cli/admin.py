"""`cipherpool admin`: operator commands that run where the database is."""

from __future__ import annotations

import click

from cipherpool.admin import Admin
from cipherpool.cli.context import CliContext, pass_ctx

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
@pass_ctx
def account_create(ctx: CliContext, name: str, organisation: str | None, contact_email: str | None) -> None:
    """Create an account and print its API key (shown once, stored only as a hash)."""
    created = Admin(ctx.settings).create_account(name, organisation=organisation or None,
                                                 contact_email=contact_email or None)
    ctx.emit({"account": created.name, **created.model_dump(mode="json"), "note": "API key shown once; hand it over now"})


@account.command("list")
@pass_ctx
def account_list(ctx: CliContext) -> None:
    """Every provider account."""
    ctx.emit(Admin(ctx.settings).list_accounts(), ACCOUNT_COLUMNS)


@account.command("show")
@click.argument("id_or_name")
@pass_ctx
def account_show(ctx: CliContext, id_or_name: str) -> None:
    """One account, by id or name."""
    ctx.emit(Admin(ctx.settings).get_account(id_or_name))


@account.command("disable")
@click.argument("id_or_name")
@pass_ctx
def account_disable(ctx: CliContext, id_or_name: str) -> None:
    """Refuse the account's API key and tokens now and stop its workers; nothing is deleted."""
    disabled = Admin(ctx.settings).disable_account(id_or_name)
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
    ctx.emit(Admin(ctx.settings).enable_account(id_or_name))
