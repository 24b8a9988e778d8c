"""`cipherpool model`: deploy and manage FHE models, their versions and their event log."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import click

from cipherpool import backends
from cipherpool.api.schemas import EVENT_ID_PATTERN, EventOut, ModelDetail
from cipherpool.cli.autoscale import autoscale
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import parse_moment

MODEL_COLUMNS = [
    "name",
    "id",
    "status",
    "hardware",
    "version",
    "min_workers",
    "max_workers",
    "shared",
    "concrete_ml",
    "created_at",
]
VERSION_COLUMNS = [
    "number",
    "serving",
    "rolling_out",
    "concrete_ml",
    "backend",
    "input_shape",
    "client_size",
    "server_size",
    "note",
    "created_at",
]
KIND_WIDTH = 21  # the longest event kind, worker_loaded_version


def emit_model(ctx: CliContext, detail: ModelDetail) -> None:
    """All of it with --json; else the settings as lines, then the versions as a table."""
    if ctx.as_json:
        ctx.emit(detail)
        return
    ctx.emit(detail.model_dump(mode="json", exclude={"versions"}))
    click.echo("\nversions:")
    ctx.emit(detail.versions, VERSION_COLUMNS)


@click.group()
def model() -> None:
    """Deploy and manage models."""


model.add_command(autoscale)  # `cipherpool model autoscale NAME`: cipherpool/cli/autoscale.py


@model.command("deploy")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--hardware", type=click.Choice(backends.host_classes()), default=backends.DEFAULT_HOST_CLASS, show_default=True)
@click.option("--description", default="", help="What the model does, for its users.")
@click.option("--min-workers", type=click.IntRange(min=0), default=0, show_default=True, help="Workers the model should keep.")
@click.option("--max-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Most workers it may have.")
@click.option("--shared/--dedicated", default=False, show_default=True, help="May it run on shared pool nodes.")
@click.option(
    "--node-selector",
    "selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="A label a pool node must carry to serve it (repeat for several).",
)
@pass_ctx
def deploy(
    ctx: CliContext,
    name: str,
    path: Path,
    hardware: str,
    description: str,
    min_workers: int,
    max_workers: int,
    shared: bool,
    selector: tuple[str, ...],
) -> None:
    """Upload the FHEModelDev(...).save() directory PATH as model NAME, version 1 (inactive until activated)."""
    emit_model(
        ctx,
        ctx.management().deploy_model(
            name,
            path,
            hardware=hardware,
            description=description,
            min_workers=min_workers,
            max_workers=max_workers,
            shared=shared,
            node_selector=parse_labels(selector),
        ),
    )


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("zone=a", "disk=ssd")`` -> ``{"zone": "a", "disk": "ssd"}``; "-" alone clears."""
    labels = {}
    for pair in pairs:
        if pair == "-":
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE.", param_hint="--node-selector")
        labels[key] = value
    return labels


@model.command("list")
@pass_ctx
def list_(ctx: CliContext) -> None:
    """This account's models."""
    ctx.emit(ctx.management().list_models(), MODEL_COLUMNS)


@model.command("show")
@click.argument("name")
@pass_ctx
def show(ctx: CliContext, name: str) -> None:
    """Settings, status, serving artifact (digest, input shape), running workers and versions."""
    emit_model(ctx, ctx.management().get_model(name))


@model.command("update")
@click.argument("name")
@click.option("--description", help="What the model does.")
@click.option("--hardware", type=click.Choice(backends.host_classes()))
@click.option("--min-workers", type=click.IntRange(min=0))
@click.option("--max-workers", type=click.IntRange(min=1))
@click.option("--shared/--no-shared", default=None, help="May it run on shared pool nodes.")
@click.option(
    "--node-selector",
    "selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="Labels a pool node must carry (repeat; `--node-selector -` clears them).",
)
@pass_ctx
def update(
    ctx: CliContext,
    name: str,
    description: str | None,
    hardware: str | None,
    min_workers: int | None,
    max_workers: int | None,
    shared: bool | None,
    selector: tuple[str, ...],
) -> None:
    """Change the settings given; the others stay."""
    node_selector = parse_labels(selector) if selector else None
    if all(v is None for v in (description, hardware, min_workers, max_workers, shared, node_selector)):
        raise click.UsageError(
            "Nothing to change: give --description, --hardware, --min-workers, --max-workers, "
            "--shared/--no-shared or --node-selector."
        )
    emit_model(
        ctx,
        ctx.management().update_model(
            name,
            description=description,
            hardware=hardware,
            min_workers=min_workers,
            max_workers=max_workers,
            shared=shared,
            node_selector=node_selector,
        ),
    )


@model.group("version")
def version() -> None:
    """A model's versions: add one (rolled out to running workers), list them."""


@version.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--note", default="", help="What changed, for the version list.")
@click.option("--wait", is_flag=True, help="Return once every worker serves the new version.")
@click.option("--timeout", type=float, help="Seconds to wait with --wait.")
@pass_ctx
def version_add(ctx: CliContext, name: str, path: Path, note: str, wait: bool, timeout: float | None) -> None:
    """Upload PATH as NAME's next version; workers load it one at a time and keep answering."""
    emit_model(ctx, ctx.management().deploy_version(name, path, note, wait=wait, timeout=timeout))


@version.command("list")
@click.argument("name")
@pass_ctx
def version_list(ctx: CliContext, name: str) -> None:
    """NAME's versions, oldest first; `serving` marks the one queries use."""
    ctx.emit(ctx.management().list_versions(name), VERSION_COLUMNS)


@model.command("rollback")
@click.argument("name")
@click.option("--to", "to_version", type=click.IntRange(min=1), help="The version to serve (default: the one before).")
@click.option("--wait", is_flag=True, help="Return once every worker serves it.")
@click.option("--timeout", type=float, help="Seconds to wait with --wait.")
@pass_ctx
def rollback(ctx: CliContext, name: str, to_version: int | None, wait: bool, timeout: float | None) -> None:
    """Serve an earlier version again, e.g. after a bad rollout."""
    emit_model(ctx, ctx.management().rollback_model(name, to_version, wait=wait, timeout=timeout))


@model.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def delete(ctx: CliContext, name: str, yes: bool) -> None:
    """Delete NAME with its versions, keys and events (refused while workers serve it)."""
    if not yes:
        click.confirm(f"Delete model {name!r} with its versions, keys and events?", abort=True, err=True)
    ctx.management().delete_model(name)
    ctx.emit({"deleted": name})


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


def _since(text: str | None) -> datetime | str | None:
    """An event id (``ev_…``: events after it) or an ISO 8601 time (events at or after it)."""
    if text is None:
        return None
    if re.fullmatch(EVENT_ID_PATTERN, text.strip()):
        return text.strip()
    try:
        return parse_moment(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; or give an event id", param_hint="--since") from None


def _print_event(ctx: CliContext, event: EventOut) -> None:
    if ctx.as_json:
        click.echo(json.dumps(event.model_dump(mode="json")))
    else:
        click.echo(f"{event.at}  {event.kind:<{KIND_WIDTH}}  {event.message}")


@model.command("events")
@click.argument("name")
@click.option("--since", help="Events at or after an ISO 8601 time, or after an event id.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (the oldest first).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@pass_ctx
def events(ctx: CliContext, name: str, since: str | None, limit: int | None, follow: bool) -> None:
    """NAME's event log (deploys, versions, rollouts, settings, workers, tokens), oldest first.
    With --follow and --json: one JSON object per line."""
    client = ctx.management()
    if not follow:
        found = client.model_events(name, _since(since), limit=limit)
        if ctx.as_json:
            ctx.emit(found)
        else:
            for event in found:
                _print_event(ctx, event)
        return
    if limit is not None:
        raise click.UsageError("--limit does not combine with --follow.")
    try:
        for event in client.follow_events(name, _since(since)):
            _print_event(ctx, event)
    except KeyboardInterrupt:  # the way to stop following
        pass
