"""`cipherpool worker`: bind pool nodes to models and release them."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import click

from cipherpool.cli import statsview
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import parse_duration
from cipherpool.client.management import WorkerInfo
from cipherpool.errors import CipherpoolError, WorkerNotFound

WORKER_COLUMNS = ["id", "model", "node", "profile", "status", "node_status", "started_at", "stop_reason", "error"]


def _row(info: WorkerInfo) -> dict[str, object]:
    return info.model_dump(mode="json")


@click.group()
def worker() -> None:
    """Start, stop and list workers (model bindings on pool nodes)."""


@worker.command("start")
@click.argument("model_name")
@click.option("--count", type=click.IntRange(1, 64), default=1, show_default=True, help="Workers to start (all or none).")
@click.option("--profile", help="Only on pool nodes of this profile.")
@click.option("--standby", is_flag=True, help="Load the model but do not take queries until `worker resume`.")
@click.option("--no-wait", is_flag=True, help="Return at once instead of when the model is loaded.")
@click.option("--timeout", type=float, help="Seconds to wait for the node to load the model.")
@pass_ctx
def start(
    ctx: CliContext, model_name: str, count: int, profile: str | None, standby: bool, no_wait: bool, timeout: float | None
) -> None:
    """Bind free pool nodes to MODEL_NAME; returns when they serve, or fails with the reason."""
    workers = ctx.management().start_workers(
        model_name, count, profile=profile, standby=standby, wait=not no_wait, timeout=timeout
    )
    ctx.emit(_row(workers[0]) if count == 1 else [_row(w) for w in workers], None if count == 1 else WORKER_COLUMNS)


@worker.command("standby")
@click.argument("worker_id")
@pass_ctx
def standby(ctx: CliContext, worker_id: str) -> None:
    """Stop taking queries but keep the model loaded (resume is instant)."""
    ctx.emit(_row(ctx.management().standby_worker(worker_id)))


@worker.command("resume")
@click.argument("worker_id")
@pass_ctx
def resume(ctx: CliContext, worker_id: str) -> None:
    """Take queries again after standby."""
    ctx.emit(_row(ctx.management().resume_worker(worker_id)))


@worker.command("logs")
@click.argument("worker_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines; Ctrl-C stops.")
@pass_ctx
def logs(ctx: CliContext, worker_id: str, follow: bool) -> None:
    """A worker's log: claimed, loading, loaded, up, standby, failures, stop and why."""
    mc, after = ctx.management(), -1
    while True:
        lines = mc.worker_logs(worker_id, after)
        for line in lines:
            if ctx.as_json:
                click.echo(line.model_dump_json())
            else:
                when = datetime.fromtimestamp(line.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
                click.echo(f"{when} {line.level.upper():<7} {line.source}: {line.message}")
            after = line.n
        if not follow:
            return
        time.sleep(1.0)


@worker.command("stop")
@click.argument("worker_id", required=False)
@click.option("--model", "model_name", metavar="NAME", help="Stop one of this model's workers (the newest) instead of WORKER_ID.")
@click.option("--all", "everything", is_flag=True, help="With --model: stop all of the model's workers.")
@pass_ctx
def stop(ctx: CliContext, worker_id: str | None, model_name: str | None, everything: bool) -> None:
    """Unbind a worker (WORKER_ID, or one of --model NAME's; --all: all of them); queued
    queries wait for another node of the model."""
    if everything and model_name is None:
        raise click.UsageError("--all stops all of a model's workers: give --model NAME.")
    if (worker_id is None) == (model_name is None):
        raise click.UsageError("Give a WORKER_ID or --model NAME (one of the two).")
    mc = ctx.management()
    if worker_id is not None:
        ctx.emit(_row(mc.stop_worker(worker_id)))
        return
    assert model_name is not None
    running = sorted(
        (w for w in mc.list_workers(model_name) if w.status.wanted),
        key=lambda w: (w.started_at or w.created_at, w.created_at),
        reverse=True,  # the newest first: the one stopped alone
    )
    if not running:
        raise WorkerNotFound(
            f"Model {model_name!r} has no running worker to stop (`cipherpool worker list --model {model_name}` "
            "shows its stopped and failed ones)."
        )
    stopped: list[dict[str, object]] = []
    for target in running if everything else running[:1]:
        try:
            stopped.append(_row(mc.stop_worker(target.id)))
        except CipherpoolError:
            if stopped:
                click.echo(f"stopped {', '.join(str(r['id']) for r in stopped)} before this refusal:", err=True)
            raise
    if everything:
        ctx.emit(stopped, WORKER_COLUMNS)
    else:
        ctx.emit(stopped[0])


@worker.command("list")
@click.option("--model", "model_name", help="Only this model's workers.")
@pass_ctx
def list_(ctx: CliContext, model_name: str | None) -> None:
    """This account's workers."""
    ctx.emit([_row(w) for w in ctx.management().list_workers(model_name)], WORKER_COLUMNS)


@worker.command("stats")
@click.option("--model", "model_name", help="Only this model and its workers.")
@click.option("--window", "window", default=None, help="Averages over this long (e.g. 5m, 1h; whole minutes).")
@click.option("--last", type=click.IntRange(1, 200), help="Current query time: average of this many latest queries.")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C (a live table).")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@click.option("--count", type=click.IntRange(1), help="With --watch: stop after this many redraws.")
@click.option("--nodes", is_flag=True, help="Instead: each running worker's live report from its node (JSON).")
@pass_ctx
def stats(
    ctx: CliContext,
    model_name: str | None,
    window: str | None,
    last: int | None,
    watch: bool,
    interval: float,
    count: int | None,
    nodes: bool,
) -> None:
    """Average and current query time per model and worker, queue wait apart from compute,
    queue depth, queries per minute, error and refusal rates."""
    mc = ctx.management()
    if nodes:
        ctx.as_json = True
        ctx.emit(mc.worker_stats(model_name))
        return
    window_s = int(parse_duration(window)) if window else None
    drawn = 0
    while True:
        found = mc.model_stats(model_name, window_s=window_s, last=last)
        if watch and not ctx.as_json:
            click.clear()
        if not ctx.as_json:
            click.echo(statsview.header(found))
        ctx.emit(found if ctx.as_json else statsview.rows(found), statsview.COLUMNS)
        drawn += 1
        if not watch or (count is not None and drawn >= count):
            return
        time.sleep(interval)
