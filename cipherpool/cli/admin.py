"""`cipherpool admin`: operator commands that run where the database is."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.db import init_db, session_scope
from cipherpool.files import private_sqlite
from cipherpool.services.accounts import create_account


@click.group()
def admin() -> None:
    """Operator commands (need database access)."""


@admin.group()
def account() -> None:
    """Provider accounts."""


@account.command("create")
@click.argument("name")
@pass_ctx
def account_create(ctx: CliContext, name: str) -> None:
    """Create an account and print its API key (shown once, stored only as a hash)."""
    url = ctx.settings.effective_database_url()
    private_sqlite(url)
    init_db(url)
    with session_scope(url) as session:
        acct, api_key = create_account(session, name)
    ctx.emit({"account": acct.name, "id": acct.id, "api_key": api_key})
