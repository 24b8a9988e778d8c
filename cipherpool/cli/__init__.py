"""The `cipherpool` command: one click group of nouns (up, demo, db, admin, gateway, account,
credits, model, worker, pool, token, query, alert, schedule, status, store, flower), sharing one :class:`CliContext`.
Every command that prints takes ``--json`` after its name as well as before it (``cipherpool model list --json``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import click

from cipherpool.cli import (
    account,
    admin,
    alerts,
    credits,
    db,
    flower,
    gateway,
    models,
    platform,
    pool,
    query,
    schedules,
    status,
    store,
    tokens,
    workers,
)
from cipherpool.cli.context import CipherpoolGroup, CliContext
from cipherpool.config.settings import get_settings
from cipherpool.fhe.process import keep_exit_status


@click.group(cls=CipherpoolGroup)
@click.option("--url", envvar="CIPHERPOOL_URL", help="Gateway URL (default: the local stack's, from `up`).")
@click.option("--broker-url", envvar="CIPHERPOOL_BROKER_URL", help="Broker (Redis) URL, for platform processes only.")
@click.option("--api-key", envvar="CIPHERPOOL_API_KEY", help="Account API key (management commands).")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="CIPHERPOOL_DATA_DIR", help="Data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="cipherpool")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str | None,
    broker_url: str | None,
    api_key: str | None,
    data_dir: Path | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Serve encrypted (FHE) machine-learning queries on a pool of Celery workers."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {"url": url, "broker_url": broker_url, "api_key": api_key, "data_dir": data_dir}
    overrides = {k: v for k, v in given.items() if v}
    ctx.obj = CliContext(get_settings().model_copy(update=overrides), as_json=as_json)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """A subcommand's --json: the same as the global one (the root's callback made the context)."""
    shared = ctx.find_object(CliContext)
    if value and shared is not None:
        shared.as_json = True


def _leaves(command: click.Command) -> Iterator[click.Command]:
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _leaves(sub)
    else:
        yield command


def add_json_options(root: click.Group) -> None:
    """Give every leaf command a --json of its own, unless it has one."""
    for command in _leaves(root):
        if not any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params):
            command.params.append(
                click.Option(
                    ["--json"],
                    is_flag=True,
                    expose_value=False,
                    is_eager=False,
                    callback=_set_json,
                    help="Print machine-readable JSON.",
                )
            )


for group in (
    platform.up,
    platform.demo,
    db.db,
    admin.admin,
    gateway.gateway,
    account.account,
    credits.credits_,
    models.model,
    workers.worker,
    pool.pool,
    tokens.token,
    query.query,
):
    cli.add_command(group)
cli.add_command(alerts.alert)
cli.add_command(schedules.schedule)
cli.add_command(status.status)
cli.add_command(store.store)
cli.add_command(flower.flower)
add_json_options(cli)


def main() -> None:
    try:
        cli(prog_name="cipherpool")
    finally:
        keep_exit_status()  # a command that ran FHE in this process still exits with its own status
