"""The `cipherpool` command: one click group of nouns (up, demo, db, admin, gateway, model,
worker, token, query), sharing one :class:`CliContext`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cipherpool.cli import admin, db, gateway, models, platform, query, tokens, workers
from cipherpool.cli.context import CipherpoolGroup, CliContext
from cipherpool.config.settings import get_settings


@click.group(cls=CipherpoolGroup)
@click.option("--url", envvar="CIPHERPOOL_URL", help="Gateway URL (default: the local stack's, from `up`).")
@click.option("--broker-url", envvar="CIPHERPOOL_BROKER_URL", help="Broker (Redis) URL, for platform processes only.")
@click.option("--api-key", envvar="CIPHERPOOL_API_KEY", help="Account API key (management commands).")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="CIPHERPOOL_DATA_DIR", help="Data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="cipherpool")
@click.pass_context
def cli(ctx: click.Context, url: str | None, broker_url: str | None, api_key: str | None, data_dir: Path | None,
        as_json: bool, verbose: bool) -> None:
    """Serve encrypted (FHE) machine-learning queries on a pool of Celery workers."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {"url": url, "broker_url": broker_url, "api_key": api_key, "data_dir": data_dir}
    overrides = {k: v for k, v in given.items() if v}
    ctx.obj = CliContext(get_settings().model_copy(update=overrides), as_json=as_json)


for group in (platform.up, platform.demo, db.db, admin.admin, gateway.gateway, models.model, workers.worker,
              tokens.token, query.query):
    cli.add_command(group)


def main() -> None:
    cli(prog_name="cipherpool")
