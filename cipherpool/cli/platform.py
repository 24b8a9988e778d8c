"""`cipherpool up` and `cipherpool demo`: running the platform itself.

Words: a *pool node* is a persistent `celery worker` process (``--nodes``); a *worker* is a
model's serving unit bound to a node (`cipherpool worker start`). ``--workers`` is the old
name of ``--nodes``: it still works, hidden from --help, with a warning on stderr.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.vital import VitalAlarm
from cipherpool.files import private_umask
from cipherpool.monitoring.beat_jobs import schedule
from cipherpool.stack.embedded import FLOWER_LOGIN_FILE, EmbeddedStack, StackOptions
from cipherpool.stack.lock import check_free
from cipherpool.stack.supervisor import Child

F = TypeVar("F", bound=Callable[..., Any])
AT_LEAST_ONE = click.IntRange(min=1)


def nodes_option(default: int) -> Callable[[F], F]:
    """``--nodes N``, and ``--workers N``, its deprecated alias (resolved by `_nodes`)."""

    def decorate(f: F) -> F:
        f = click.option(
            "--workers",
            type=AT_LEAST_ONE,
            hidden=True,
            deprecated="Use --nodes (a worker is a model's serving unit, a node a process).",
        )(f)
        return click.option(
            "--nodes",
            type=AT_LEAST_ONE,
            default=default,
            show_default=True,
            help="Pool nodes (celery worker processes) to start.",
        )(f)

    return decorate


def _nodes(nodes: int, workers: int | None) -> int:
    """The node count: --workers (the old name) when given, and only one of the two."""
    if workers is None:
        return nodes
    if click.get_current_context().get_parameter_source("nodes") is not ParameterSource.DEFAULT:
        raise click.UsageError("--workers is the old name of --nodes; give only --nodes.")
    return workers


def _report_restart(child: Child) -> None:
    click.echo(f"{child.name} exited; restarted as pid {child.pid} (log: {child.log_path})", err=True)


@click.command()
@nodes_option(default=2)
@click.option("--concurrency", type=AT_LEAST_ONE, default=1, show_default=True, help="Parallel queries per node.")
@click.option("--host", help="Gateway address (default 127.0.0.1; 0.0.0.0 exposes it).")
@click.option("--port", type=int, help="Gateway port (default: a free one).")
@click.option("--no-beat", is_flag=True, help="Do not start beat.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="NAME",
    help="Start a pool node of this profile (profiles.toml); repeat for more. Replaces --nodes.",
)
@pass_ctx
def up(
    ctx: CliContext,
    nodes: int,
    workers: int | None,
    concurrency: int,
    host: str | None,
    port: int | None,
    no_beat: bool,
    no_flower: bool,
    profiles: tuple[str, ...],
) -> None:
    """Start the whole platform on this machine; Ctrl-C or SIGTERM stops all of it.

    Clients on this machine (CLI and Python) find the gateway with no exports: its URL is in
    the data directory's stack.json while the stack runs. One stack per data directory: a
    second `up` there is refused, naming the running one."""
    nodes = _nodes(nodes, workers)
    check_free(Path(ctx.settings.data_dir).expanduser().resolve())  # before anything starts or prints
    private_umask()
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    options = StackOptions(
        nodes=nodes, node_concurrency=concurrency, beat=not no_beat, flower=not no_flower, profiles=list(profiles)
    )
    gateway = {k: v for k, v in {"gateway_host": host, "gateway_port": port}.items() if v}
    stack = EmbeddedStack(ctx.settings.model_copy(update=gateway), options)
    click.echo("starting cipherpool …")
    try:
        stack.start()
        for name, where in stack.describe():
            click.echo(f"  {name:<10} {where}")
        if stack.flower_auth:
            click.echo(f"  flower login: {stack.flower_auth} (kept in {stack.data_dir / FLOWER_LOGIN_FILE})")
        click.echo(f"ready. Gateway {stack.gateway_url} (API docs {stack.gateway_url}/docs).")
        click.echo(f"  Clients on this machine find it in {stack.data_dir / 'stack.json'}; elsewhere set CIPHERPOOL_URL.")
        click.echo(f"  `cipherpool admin account create NAME` makes a provider account (data dir {stack.data_dir}).")
        click.echo("Ctrl-C stops everything.")
        # Beat or the control worker given up: said loudly at once, and every minute until stopped.
        alarm = VitalAlarm([job.name for job in schedule(ctx.settings)])
        threading.Thread(target=alarm.repeat, args=(stop,), name="cipherpool-up-alarm", daemon=True).start()
        stack.supervisor.watch(stop, on_restart=_report_restart, on_give_up=alarm.given_up)
    finally:
        stop.set()
        click.echo("stopping …")
        stack.stop()
        click.echo("stopped.")
        for sig, handler in handlers.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(sig, handler)


@click.command()
@click.argument("names", nargs=-1, type=click.Choice(["digits", "health", "image", "sentiment", "all"]))
@click.option(
    "--text",
    "texts",
    multiple=True,
    metavar="TEXT",
    help="A sentence for the sentiment tutorial (repeatable); default: four examples.",
)
@click.option("--explain", is_flag=True, help="Also print, per step, where it ran and what crossed the network.")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON report on stdout (progress goes to stderr).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cipherpool-demo"),
    show_default=True,
    help="Where tutorials write their files (the image tutorial's PNGs), per tutorial.",
)
@click.option(
    "--data-dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's platform files here (default: a temporary directory, removed after).",
)
@nodes_option(default=1)
@pass_ctx
def demo(
    ctx: CliContext,
    names: tuple[str, ...],
    texts: tuple[str, ...],
    explain: bool,
    json_out: bool,
    out_dir: Path,
    demo_dir: Path | None,
    nodes: int,
    workers: int | None,
) -> None:
    """Run the tutorials end to end on an embedded stack: digits (the default, the quick one),
    health, image, sentiment, or all. Each prints its steps with timings and sizes and every
    FHE answer beside the model's clear answer, and fails if they differ."""
    from cipherpool.demo import run_demo

    previous = private_umask()  # keys, models and images the demo writes are its user's alone, as under `up`
    try:
        run_demo(
            ctx.settings,
            demo_dir,
            nodes=_nodes(nodes, workers),
            names=names,
            texts=texts,
            out_dir=out_dir,
            explain=explain,
            json_out=json_out or ctx.as_json,
            echo=click.echo,
        )
    finally:
        os.umask(previous)
