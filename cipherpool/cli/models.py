"""`cipherpool model`: deploy and manage FHE models."""

from __future__ import annotations

from pathlib import Path

import click

from cipherpool.cli.context import CliContext, pass_ctx

MODEL_COLUMNS = ["name", "id", "status", "hardware", "concrete_ml", "created_at"]


@click.group()
def model() -> None:
    """Deploy and manage models."""


@model.command("deploy")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--hardware", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@pass_ctx
def deploy(ctx: CliContext, name: str, path: Path, hardware: str) -> None:
    """Upload the FHEModelDev(...).save() directory PATH as model NAME (inactive until activated)."""
    ctx.emit(ctx.management().deploy_model(name, path, hardware=hardware))


@model.command("list")
@pass_ctx
def list_(ctx: CliContext) -> None:
    """This account's models."""
    ctx.emit(ctx.management().list_models(), MODEL_COLUMNS)


@model.command("activate")
@click.argument("name")
@pass_ctx
def activate(ctx: CliContext, name: str) -> None:
    """Start accepting queries for NAME."""
    ctx.emit(ctx.management().activate_model(name))


@model.command("deactivate")
@click.argument("name")
@pass_ctx
def deactivate(ctx: CliContext, name: str) -> None:
    """Refuse queries for NAME (workers keep running)."""
    ctx.emit(ctx.management().deactivate_model(name))
