"""`cipherpool db`: the platform database's schema, made and changed by migrations
(cipherpool/db/migrations). `up` applies them too; these commands are for operators who run
the database apart from the stack, e.g. PostgreSQL before a deploy."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.config.settings import mask_url
from cipherpool.db import Upgrade, current_revision, head_revision, upgrade_db
from cipherpool.files import private_sqlite


@click.group()
def db() -> None:
    """The platform database."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate up to this revision.")
@pass_ctx
def db_upgrade(ctx: CliContext, revision: str) -> None:
    """Apply the pending schema migrations (safe to run again)."""
    _upgrade(ctx, revision)


@db.command("init")
@pass_ctx
def db_init(ctx: CliContext) -> None:
    """Create or update the schema: an alias of `db upgrade` (to the newest revision)."""
    _upgrade(ctx, "head")


@db.command("current")
@pass_ctx
def db_current(ctx: CliContext) -> None:
    """Print the database's schema revision and the newest one this version ships."""
    url = ctx.settings.effective_database_url()
    current, head = current_revision(url), head_revision()
    ctx.emit({"current": current, "head": head, "up_to_date": current == head, "database": mask_url(url)})


def _upgrade(ctx: CliContext, revision: str) -> None:
    url = ctx.settings.effective_database_url()
    private_sqlite(url)
    done = upgrade_db(url, revision)
    if ctx.as_json:
        ctx.emit(
            {
                "from": done.from_revision,
                "to": done.to_revision,
                "adopted": done.adopted,
                "changed": done.changed,
                "database": mask_url(url),
            }
        )
    else:
        click.echo(f"database {_describe(done)}: {mask_url(url)}")


def _describe(done: Upgrade) -> str:
    before = "unversioned (made before migrations; stamped at the baseline)" if done.adopted else done.from_revision or "empty"
    return f"{before} -> {done.to_revision}" if done.changed else f"already at {done.to_revision}"
