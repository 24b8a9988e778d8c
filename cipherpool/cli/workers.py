"""`cipherpool worker`: bind pool nodes to models and release them."""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.client.management import WorkerInfo

WORKER_COLUMNS = ["id", "model", "node", "status", "node_status", "started_at", "error"]


def _row(info: WorkerInfo) -> dict[str, object]:
    return info.model_dump(mode="json")


@click.group()
def worker() -> None:
    """Start, stop and list workers (model bindings on pool nodes)."""


@worker.command("start")
@click.argument("model_name")
@click.option("--no-wait", is_flag=True, help="Return at once instead of when the model is loaded.")
@click.option("--timeout", type=float, help="Seconds to wait for the node to load the model.")
@pass_ctx
def start(ctx: CliContext, model_name: str, no_wait: bool, timeout: float | None) -> None:
    """Bind a free pool node to MODEL_NAME; returns when it serves, or fails with the reason."""
    ctx.emit(_row(ctx.management().start_worker(model_name, wait=not no_wait, timeout=timeout)))


@worker.command("stop")
@click.argument("worker_id")
@pass_ctx
def stop(ctx: CliContext, worker_id: str) -> None:
    """Unbind a worker; queued queries wait for another node of the model."""
    ctx.emit(_row(ctx.management().stop_worker(worker_id)))


@worker.command("list")
@click.option("--model", "model_name", help="Only this model's workers.")
@pass_ctx
def list_(ctx: CliContext, model_name: str | None) -> None:
    """This account's workers."""
    ctx.emit([_row(w) for w in ctx.management().list_workers(model_name)], WORKER_COLUMNS)


@worker.command("stats")
@click.option("--model", "model_name", help="Only this model's workers.")
@pass_ctx
def stats(ctx: CliContext, model_name: str | None) -> None:
    """Live figures of running workers: queries, compute time, key cache."""
    ctx.as_json = True
    ctx.emit(ctx.management().worker_stats(model_name))
