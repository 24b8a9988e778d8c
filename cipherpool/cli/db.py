"""`cipherpool db`: the platform database's schema."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.db import init_db


@click.group()
def db() -> None:
    """The platform database."""


@db.command("init")
@pass_ctx
def db_init(ctx: CliContext) -> None:
    """Create the schema (safe to run again)."""
    url = ctx.settings.effective_database_url()
    init_db(url)
    click.echo(f"database ready: {url}")
