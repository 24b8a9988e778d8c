"""`cipherpool token`: access tokens for end users."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx

TOKEN_COLUMNS = ["id", "name", "model", "prefix", "revoked", "expires_at", "created_at"]


@click.group()
def token() -> None:
    """Access tokens for end users."""


@token.command("create")
@click.argument("name")
@click.option("--model", "model_name", required=True, help="The model the token may query.")
@click.option("--ttl", "ttl_s", type=float, help="Expire after this many seconds.")
@pass_ctx
def create(ctx: CliContext, name: str, model_name: str, ttl_s: float | None) -> None:
    """Create a token and print its value (shown once, stored only as a hash)."""
    value = ctx.management().create_token(name, model_name, ttl_s)
    ctx.emit({"name": name, "model": model_name, "token": value, "note": "shown once; store it now"})


@token.command("list")
@pass_ctx
def list_(ctx: CliContext) -> None:
    """This account's tokens (never their values)."""
    ctx.emit(ctx.management().list_tokens(), TOKEN_COLUMNS)


@token.command("revoke")
@click.argument("token_id")
@pass_ctx
def revoke(ctx: CliContext, token_id: str) -> None:
    """Revoke a token at once; its queries are refused from now on."""
    ctx.emit(ctx.management().revoke_token(token_id))
