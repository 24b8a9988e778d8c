"""`cipherpool token`: access tokens for end users: which models, how long, how many queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import DURATION, MOMENT

TOKEN_COLUMNS = ["id", "name", "models", "masked", "status", "expires_at", "last_used_at", "queries_used", "quota"]


def expiry_options(command: Any) -> Any:
    """--expires-in / --expires-at / --no-expiry (at most one; checked by :func:`one_expiry`)."""
    command = click.option("--no-expiry", is_flag=True, help="Never expire.")(command)
    command = click.option("--expires-at", type=MOMENT, help="Expire at this ISO 8601 time (UTC unless it has an offset).")(
        command
    )
    return click.option("--expires-in", type=DURATION, help="Expire after this long: 30d, 12h, 90m, 3600s.")(command)


def one_expiry(expires_in: float | None, expires_at: datetime | None, no_expiry: bool) -> None:
    if sum((expires_in is not None, expires_at is not None, no_expiry)) > 1:
        raise click.UsageError("Give at most one of --expires-in, --expires-at and --no-expiry.")


@click.group()
def token() -> None:
    """Access tokens for end users."""


@token.command("create")
@click.argument("name")
@click.option("--model", "models", multiple=True, help="A model the token may query (repeat for more).")
@expiry_options
@click.option("--ttl", "ttl_s", type=float, hidden=True, help="Expire after this many seconds (use --expires-in).")
@click.option("--quota", type=click.IntRange(min=0), help="Most queries it may make.")
@pass_ctx
def create(
    ctx: CliContext,
    name: str,
    models: tuple[str, ...],
    expires_in: float | None,
    expires_at: datetime | None,
    no_expiry: bool,
    ttl_s: float | None,
    quota: int | None,
) -> None:
    """Create a token and print its value (shown once, stored only as a hash). It expires in
    30 days unless told otherwise."""
    if expires_in is not None and ttl_s is not None:
        raise click.UsageError("Give --expires-in or --ttl, not both.")
    expires_in = expires_in if expires_in is not None else ttl_s
    one_expiry(expires_in, expires_at, no_expiry)
    created = ctx.management().new_token(
        name, models=list(models), ttl_s=expires_in, expires_at=expires_at, no_expiry=no_expiry, quota=quota
    )
    ctx.emit({**created.model_dump(mode="json"), "note": "shown once; store it now"})


@token.command("list")
@click.option("--model", "model_name", help="Only tokens assigned to this model.")
@pass_ctx
def list_(ctx: CliContext, model_name: str | None) -> None:
    """This account's tokens, masked (never their values)."""
    ctx.emit(ctx.management().list_tokens(model_name), TOKEN_COLUMNS)


@token.command("show")
@click.argument("token_id")
@pass_ctx
def show(ctx: CliContext, token_id: str) -> None:
    """One token: models, status, expiry, quota and use."""
    ctx.emit(ctx.management().get_token(token_id))


@token.command("update")
@click.argument("token_id")
@click.option("--name", help="A new name.")
@expiry_options
@click.option("--quota", type=click.IntRange(min=0), help="Most queries it may make (counting those made).")
@click.option("--no-quota", is_flag=True, help="Remove the quota.")
@click.option("--enable/--disable", "enabled", default=None, help="Disable until enabled again (unlike revoke).")
@pass_ctx
def update(
    ctx: CliContext,
    token_id: str,
    name: str | None,
    expires_in: float | None,
    expires_at: datetime | None,
    no_expiry: bool,
    quota: int | None,
    no_quota: bool,
    enabled: bool | None,
) -> None:
    """Change what is given; the rest stays."""
    one_expiry(expires_in, expires_at, no_expiry)
    if quota is not None and no_quota:
        raise click.UsageError("Give --quota or --no-quota, not both.")
    changes: dict[str, Any] = {"name": name, "ttl_s": expires_in, "enabled": enabled}
    changes = {k: v for k, v in changes.items() if v is not None}
    if expires_at is not None or no_expiry:
        changes["expires_at"] = expires_at  # None: never expires
    if quota is not None or no_quota:
        changes["quota"] = quota  # None: no quota
    if not changes:
        raise click.UsageError("Nothing to change: give --name, an expiry, a quota, --enable or --disable.")
    ctx.emit(ctx.management().update_token(token_id, **changes))


@token.command("assign")
@click.argument("token_id")
@click.argument("model_name")
@pass_ctx
def assign(ctx: CliContext, token_id: str, model_name: str) -> None:
    """Let the token query MODEL_NAME too."""
    ctx.emit(ctx.management().assign_token(token_id, model_name))


@token.command("unassign")
@click.argument("token_id")
@click.argument("model_name")
@pass_ctx
def unassign(ctx: CliContext, token_id: str, model_name: str) -> None:
    """Stop the token querying MODEL_NAME; its other models stay."""
    ctx.emit(ctx.management().unassign_token(token_id, model_name))


@token.command("revoke")
@click.argument("token_id")
@pass_ctx
def revoke(ctx: CliContext, token_id: str) -> None:
    """Revoke a token for good; its queries are refused from now on (it stays listed)."""
    ctx.emit(ctx.management().revoke_token(token_id))


@token.command("delete")
@click.argument("token_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def delete(ctx: CliContext, token_id: str, yes: bool) -> None:
    """Delete a token and its uploaded keys; it is no longer listed."""
    if not yes:
        click.confirm(f"Delete token {token_id}?", abort=True, err=True)
    ctx.management().delete_token(token_id)
    ctx.emit({"deleted": token_id})
