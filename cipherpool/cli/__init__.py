"""The `cipherpool` command: one click group of nouns (up, demo, db, admin, gateway, account,
credits, model, worker, pool, token, query, alert, schedule, status, store, flower), sharing one :class:`CliContext`.
Every command that prints takes ``--json`` after its name as well as before it (``cipherpool model list --json``).

Each noun's module is imported when that noun runs (or when ``cipherpool --help`` lists them
all), not when the group is: ``cipherpool query predict`` does not pay for Celery, SQLAlchemy,
FastAPI and Redis, which the platform's commands import, and a client install (``pip install
cipherpool``, without the ``server`` extra) runs the client's commands and says in one line
what to install for the platform's (:data:`COMMANDS`)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cipherpool.cli.context import CipherpoolGroup, CliContext, needs_server, server_missing
from cipherpool.config.settings import get_settings
from cipherpool.fhe.process import keep_exit_status


@dataclass(frozen=True)
class Noun:
    target: str  # "module:attribute" of its click command
    server: bool = False  # part of the platform: needs the server extra (its processes, its database, its Redis)


COMMANDS: dict[str, Noun] = {
    "up": Noun("cipherpool.cli.platform:up", server=True),
    "demo": Noun("cipherpool.cli.platform:demo", server=True),
    "db": Noun("cipherpool.cli.db:db", server=True),
    "admin": Noun("cipherpool.cli.admin:admin", server=True),
    "gateway": Noun("cipherpool.cli.gateway:gateway", server=True),
    "pool": Noun("cipherpool.cli.pool:pool", server=True),
    "status": Noun("cipherpool.cli.status:status", server=True),
    "store": Noun("cipherpool.cli.store:store", server=True),
    "flower": Noun("cipherpool.cli.flower:flower", server=True),
    # Clients of the gateway: the provider's and the end user's (in a client install too).
    "account": Noun("cipherpool.cli.account:account"),
    "credits": Noun("cipherpool.cli.credits:credits_"),
    "model": Noun("cipherpool.cli.models:model"),
    "worker": Noun("cipherpool.cli.workers:worker"),
    "token": Noun("cipherpool.cli.tokens:token"),
    "query": Noun("cipherpool.cli.query:query"),
    "alert": Noun("cipherpool.cli.alerts:alert"),
    "schedule": Noun("cipherpool.cli.schedules:schedule"),
}


class NounGroup(CipherpoolGroup):
    """The root group: its nouns are imported by name when asked for (click's lazy loading),
    each given its ``--json`` options then. A platform noun in an install without the server
    extra is a stand-in that says what to install."""

    def __init__(self, *args: Any, nouns: dict[str, Noun], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nouns = nouns

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.nouns))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.nouns:
            return super().get_command(ctx, cmd_name)
        noun = self.nouns[cmd_name]
        if noun.server and (missing := server_missing()):
            return needs_server(cmd_name, missing)
        module, _, attribute = noun.target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{noun.target} is not a click command")
        add_json_options(command)
        self.add_command(command, cmd_name)
        return command


@click.group(cls=NounGroup, nouns=COMMANDS)
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


def add_json_options(root: click.Command) -> None:
    """Give every leaf command under ``root`` a --json of its own, unless it has one."""
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


def main() -> None:
    try:
        cli(prog_name="cipherpool")
    finally:
        keep_exit_status()  # a command that ran FHE in this process still exits with its own status
