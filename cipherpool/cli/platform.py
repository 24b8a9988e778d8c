"""`cipherpool up` and `cipherpool demo`: running the platform itself."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.files import private_umask
from cipherpool.stack.embedded import EmbeddedStack, StackOptions


@click.command()
@click.option("--workers", default=2, show_default=True, help="Pool nodes to start.")
@click.option("--concurrency", default=1, show_default=True, help="Parallel queries per node.")
@click.option("--host", help="Gateway address (default 127.0.0.1; 0.0.0.0 exposes it).")
@click.option("--port", type=int, help="Gateway port (default: a free one).")
@click.option("--no-beat", is_flag=True, help="Do not start beat.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@pass_ctx
def up(ctx: CliContext, workers: int, concurrency: int, host: str | None, port: int | None,
       no_beat: bool, no_flower: bool) -> None:
    """Start the whole platform on this machine; Ctrl-C or SIGTERM stops all of it.

    Clients on this machine (CLI and Python) find the gateway with no exports: its URL is in
    the data directory's stack.json while the stack runs."""
    private_umask()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    options = StackOptions(workers=workers, node_concurrency=concurrency, beat=not no_beat, flower=not no_flower)
    gateway = {k: v for k, v in {"gateway_host": host, "gateway_port": port}.items() if v}
    stack = EmbeddedStack(ctx.settings.model_copy(update=gateway), options)
    click.echo("starting cipherpool …")
    try:
        stack.start()
        for name, where in stack.describe():
            click.echo(f"  {name:<10} {where}")
        if stack.flower_auth:
            click.echo(f"  flower login (shown once): {stack.flower_auth}")
        click.echo(f"ready. Gateway {stack.gateway_url} (API docs {stack.gateway_url}/docs).")
        click.echo(f"  Clients on this machine find it in {stack.data_dir / 'stack.json'}; elsewhere set CIPHERPOOL_URL.")
        click.echo(f"  `cipherpool admin account create NAME` makes a provider account (data dir {stack.data_dir}).")
        click.echo("Ctrl-C stops everything.")
        given_up: set[str] = set()
        while not stop.wait(1.0):
            restarted, failing = stack.supervisor.restart_dead()
            for child in restarted:
                click.echo(f"{child.name} exited; restarted as pid {child.pid} (log: {child.log_path})", err=True)
            for child in failing:
                if child.name not in given_up:
                    given_up.add(child.name)
                    click.echo(f"error: {child.name} keeps exiting at start; not restarting it. See {child.log_path}", err=True)
    finally:
        click.echo("stopping …")
        stack.stop()
        click.echo("stopped.")


@click.command()
@click.option("--data-dir", "demo_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the demo's files here (default: a temporary directory, removed after).")
@click.option("--workers", default=1, show_default=True, help="Pool nodes to start.")
@pass_ctx
def demo(ctx: CliContext, demo_dir: Path | None, workers: int) -> None:
    """Train, deploy and query a digit classifier end to end on the embedded stack."""
    from cipherpool.demo import run_demo

    run_demo(ctx.settings, demo_dir, workers=workers, echo=click.echo)
