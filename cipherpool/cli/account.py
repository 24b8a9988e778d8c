"""`cipherpool account`: the provider's own account (its details and API key)."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.client.management import UNSET


def clearable(value: str | None) -> str | None:
    """An option that an empty string clears: not given -> UNSET (unchanged), "" -> None."""
    unchanged: str | None = UNSET
    return unchanged if value is None else value or None


@click.group()
def account() -> None:
    """Your provider account: details and API key."""


@account.command("show")
@pass_ctx
def show(ctx: CliContext) -> None:
    """The account the API key belongs to."""
    ctx.emit(ctx.management().account())


@account.command("update")
@click.option("--name", help="A new account name.")
@click.option("--organisation", help="Organisation; an empty string clears it.")
@click.option("--email", "contact_email", help="Contact email; an empty string clears it.")
@pass_ctx
def update(ctx: CliContext, name: str | None, organisation: str | None, contact_email: str | None) -> None:
    """Change the details given; the others stay."""
    if name is None and organisation is None and contact_email is None:
        raise click.UsageError("Nothing to change: give --name, --organisation or --email.")
    ctx.emit(
        ctx.management().update_account(name=name, organisation=clearable(organisation), contact_email=clearable(contact_email))
    )


@account.command("rotate-key")
@pass_ctx
def rotate_key(ctx: CliContext) -> None:
    """Replace the API key (e.g. after a leak): the new one is shown once, the old one stops now."""
    key = ctx.management().rotate_api_key()
    ctx.emit({"api_key": key, "note": "shown once; store it now. The old key stopped working: update CIPHERPOOL_API_KEY."})
