"""`cipherpool status`: the platform's own health, for the operator.

It reads the database and Redis directly, as `cipherpool admin` does, rather than asking a
gateway: it is most needed when something is down, a gateway included, and a gateway cannot
tell that every gateway is gone. So it runs where the operator has the platform's database
and Redis (``CIPHERPOOL_DATABASE_URL``, ``CIPHERPOOL_BROKER_URL`` or ``_STORE_URL``); on the
machine of a `cipherpool up`, with neither set, it finds that stack's Redis in the data
directory. From anywhere else, the gateway answers the same view to the metrics token:
``GET /v1/platform/status``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from redis.exceptions import RedisError

from cipherpool.api.schemas import PlatformStatus
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.errors import BrokerUnavailable, ConfigurationError, PlatformError
from cipherpool.monitoring import platform_events
from cipherpool.monitoring.components import DEFAULT_EVENTS, read_status
from cipherpool.monitoring.platform_events import EVENTS_KEPT
from cipherpool.stack.redis_server import CONFIG_FILE, PASSWORD_FILE
from cipherpool.statuses import ComponentState

REDIS_DIR = "redis"  # where `up` keeps its Redis's config and password, under the data directory
COMPONENT_COLUMNS = ["component", "state", "detail"]
PROCESS_COLUMNS = ["role", "instance", "pid", "version", "age_s", "interval_s", "state"]
JOB_COLUMNS = ["job", "last_run", "age_s", "interval_s", "state"]
NODE_COLUMNS = ["name", "host_class", "shared", "status", "heartbeat_age_s", "bound_models", "state"]
EVENT_COLUMNS = ["id", "at", "component", "previous", "state", "detail"]


def local_store_url(settings: Settings) -> str | None:
    """The Redis of a `cipherpool up` whose data directory this is: the port in its config
    file, the password in its file (both 0600, the operator's own). None: there is none."""
    folder = Path(settings.data_dir).expanduser() / REDIS_DIR
    try:
        config = (folder / CONFIG_FILE).read_text()
        secret = (folder / PASSWORD_FILE).read_text().strip()
    except OSError:
        return None
    port = next((line.split()[1] for line in config.splitlines() if line.startswith("port ")), None)
    return f"redis://:{secret}@127.0.0.1:{port}/0" if port else None


def platform_settings(settings: Settings) -> Settings:
    if settings.store_url or settings.broker_url:
        return settings
    local = local_store_url(settings)
    if local is None:
        raise ConfigurationError(
            "`cipherpool status` reads Redis and the database directly: set CIPHERPOOL_BROKER_URL (or "
            "CIPHERPOOL_STORE_URL) and CIPHERPOOL_DATABASE_URL, or run it where `cipherpool up` runs. "
            "Elsewhere, GET /v1/platform/status on a gateway with the metrics token."
        )
    return settings.model_copy(update={"broker_url": local})


def print_status(ctx: CliContext, status: PlatformStatus) -> None:
    click.echo(f"platform: {status.state.value}  (at {status.at.isoformat(timespec='seconds')})")
    ctx.emit([c.model_dump(mode="json") for c in status.components], COMPONENT_COLUMNS)
    processes = [*status.gateways, *status.control_workers, *status.beats]
    if processes:
        click.echo()
        ctx.emit([p.model_dump(mode="json") for p in processes], PROCESS_COLUMNS)
    click.echo()
    ctx.emit([j.model_dump(mode="json") for j in status.beat_jobs], JOB_COLUMNS)
    if status.nodes:
        click.echo()
        ctx.emit([n.model_dump(mode="json") for n in status.nodes], NODE_COLUMNS)
    if status.events:
        click.echo("\nlatest platform events (all: `cipherpool status --events`):")
        ctx.emit([e.model_dump(mode="json") for e in status.events], EVENT_COLUMNS)


@click.command("status")
@click.option(
    "--events", "events_only", is_flag=True, help="List the latest platform events (each change of a component's state) instead."
)
@click.option(
    "--limit",
    type=click.IntRange(1, EVENTS_KEPT),
    default=20,
    show_default=True,
    help="How many events --events lists, newest first.",
)
@pass_ctx
def status(ctx: CliContext, events_only: bool, limit: int) -> None:
    """The platform's own health: gateways, control workers, beat and each of its jobs, pool
    nodes, Redis and the database, each ok, late or missing (silent for 3 of its intervals),
    and why. Operator only: it reads the database and Redis directly. Exits 7 (the platform
    errors' status) when a component is missing, so a script or a probe can act on it."""
    platform = PlatformContext(platform_settings(ctx.settings))
    if events_only:
        try:
            events = platform_events.latest(platform.store.redis, limit)
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis, where platform events are kept, does not answer: {exc}") from None
        ctx.emit(events, EVENT_COLUMNS)
        return
    report = read_status(platform, time.time(), events=DEFAULT_EVENTS)
    if ctx.as_json:
        ctx.emit(report)
    else:
        print_status(ctx, report)
    if report.state == ComponentState.MISSING:
        click.get_current_context().exit(PlatformError.exit_code)
