"""`cipherpool schedule`: worker schedules. A model keeps N workers of a schedule running in
each of its windows: recurring (cron expressions on a time zone's wall clock) or one-off
reservations. Beat applies them; these commands only define, show and change them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from cipherpool.api.schemas import ScheduleOut
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import MOMENT

SCHEDULE_COLUMNS = ["id", "name", "model", "when", "timezone", "workers", "running_workers", "paused", "next_start", "next_stop"]
ACTION_COLUMNS = ["at", "action", "status", "attempts", "window_start", "message"]


def _when(schedule: ScheduleOut) -> str:
    if schedule.kind.value == "cron":
        return f"{schedule.start_cron} -> {schedule.stop_cron}"
    return f"{schedule.starts_at} -> {schedule.ends_at}"


def _emit_list(ctx: CliContext, found: list[ScheduleOut]) -> None:
    """The API's answer with --json; else a table whose ``when`` column reads as the schedule."""
    if ctx.as_json:
        ctx.emit(found)
        return
    ctx.emit([{**s.model_dump(mode="json"), "when": _when(s)} for s in found], SCHEDULE_COLUMNS)


def _emit_one(ctx: CliContext, schedule: ScheduleOut) -> None:
    """``key: value`` lines, then the last actions as a table (or the API's answer with --json)."""
    if ctx.as_json:
        ctx.emit(schedule)
        return
    fields = schedule.model_dump(mode="json")
    actions = fields.pop("last_actions")
    ctx.emit(fields)
    if actions:
        click.echo("last actions:")
        ctx.emit(actions, ACTION_COLUMNS)


def _common(command: Any) -> Any:
    """--workers, --profile and --name, as ``add`` and ``reserve`` both take them."""
    command = click.option("--name", help="A name to tell schedules apart.")(command)
    command = click.option("--profile", help="Only on pool nodes of this profile.")(command)
    return click.option(
        "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Workers the model keeps in each window."
    )(command)


@click.group()
def schedule() -> None:
    """Start and stop a model's workers on a timetable (beat applies it)."""


@schedule.command("add")
@click.argument("model_name")
@click.option("--start", "start_cron", required=True, help="Cron expression of the starts, e.g. '0 8 * * 1-5'.")
@click.option("--stop", "stop_cron", required=True, help="Cron expression of the stops, e.g. '0 20 * * 1-5'.")
@click.option(
    "--tz", "timezone", default="UTC", show_default=True, help="IANA time zone the expressions are read in, e.g. Europe/Paris."
)
@_common
@pass_ctx
def add(
    ctx: CliContext,
    model_name: str,
    start_cron: str,
    stop_cron: str,
    timezone: str,
    workers: int,
    profile: str | None,
    name: str | None,
) -> None:
    """Keep WORKERS workers of MODEL_NAME from each --start to the next --stop. Five-field
    cron expressions (minute hour day-of-month month day-of-week) on the zone's wall clock."""
    created = ctx.management().create_schedule(
        model_name, start_cron=start_cron, stop_cron=stop_cron, timezone=timezone, workers=workers, profile=profile, name=name
    )
    _emit_one(ctx, created)


@schedule.command("reserve")
@click.argument("model_name")
@click.option("--from", "starts_at", type=MOMENT, required=True, help="ISO 8601 start (UTC unless it has an offset).")
@click.option("--to", "ends_at", type=MOMENT, required=True, help="ISO 8601 end (UTC unless it has an offset).")
@_common
@pass_ctx
def reserve(
    ctx: CliContext, model_name: str, starts_at: datetime, ends_at: datetime, workers: int, profile: str | None, name: str | None
) -> None:
    """Keep WORKERS workers of MODEL_NAME once, from --from to --to."""
    _emit_one(ctx, ctx.management().reserve_workers(model_name, starts_at, ends_at, workers, profile=profile, name=name))


@schedule.command("list")
@click.option("--model", "model_name", help="Only this model's schedules.")
@pass_ctx
def list_(ctx: CliContext, model_name: str | None) -> None:
    """This account's schedules, with their next start and stop."""
    _emit_list(ctx, ctx.management().list_schedules(model_name))


@schedule.command("show")
@click.argument("schedule_id")
@pass_ctx
def show(ctx: CliContext, schedule_id: str) -> None:
    """One schedule: the window open now, the next start and stop, its workers, its last actions."""
    _emit_one(ctx, ctx.management().get_schedule(schedule_id))


@schedule.command("pause")
@click.argument("schedule_id")
@pass_ctx
def pause(ctx: CliContext, schedule_id: str) -> None:
    """Start nothing more; beat stops the schedule's workers on its next tick."""
    _emit_one(ctx, ctx.management().pause_schedule(schedule_id))


@schedule.command("resume")
@click.argument("schedule_id")
@pass_ctx
def resume(ctx: CliContext, schedule_id: str) -> None:
    """Apply the schedule again; a window open now starts on beat's next tick."""
    _emit_one(ctx, ctx.management().resume_schedule(schedule_id))


@schedule.command("remove")
@click.argument("schedule_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def remove(ctx: CliContext, schedule_id: str, yes: bool) -> None:
    """Delete a schedule; its workers are stopped now."""
    if not yes:
        click.confirm(f"Remove schedule {schedule_id} and stop its workers?", abort=True, err=True)
    ctx.management().remove_schedule(schedule_id)
    ctx.emit({"removed": schedule_id})
