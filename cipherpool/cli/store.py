"""`cipherpool store`: the blob store against the database's references (operator commands).

They run where the database and the store are reachable, as `cipherpool admin` does: with
``CIPHERPOOL_DATABASE_URL``, the store's settings (``CIPHERPOOL_BLOB_STORE`` and its own) and,
for the platform's Redis, ``CIPHERPOOL_BROKER_URL`` or ``_STORE_URL``; on the machine of a
`cipherpool up`, with none of them set, they find that stack's Redis and use its store
(files under the data directory). See :mod:`cipherpool.blobs.migrate`.
"""

from __future__ import annotations

import click
import redis

from cipherpool.blobs import backend_for
from cipherpool.blobs.migrate import check, migrate, referenced
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.status import local_store_url
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.errors import ConfigurationError, NotFound
from cipherpool.store import BlobStore, redis_client


@click.group()
def store() -> None:
    """The blob store: model zips, evaluation keys, large payloads (need database access)."""


def store_settings(settings: Settings) -> Settings:
    """The settings with the store's kind fixed first (it depends on whether a broker URL is
    set), then the platform's Redis filled in from a local `cipherpool up` where none is set."""
    kind = settings.effective_blob_store()
    fixed = settings.model_copy(update={"blob_store": kind})
    if not (settings.store_url or settings.broker_url):
        local = local_store_url(settings)
        if local is not None:
            fixed = fixed.model_copy(update={"broker_url": local})
    return fixed


def _redis(settings: Settings) -> redis.Redis | None:
    return redis_client(settings.effective_store_url()) if settings.store_url or settings.broker_url else None


@store.command("check")
@click.option(
    "--orphans/--no-orphans", "show_orphans", default=True, show_default=True, help="List unreferenced blobs one by one."
)
@pass_ctx
def store_check(ctx: CliContext, show_orphans: bool) -> None:
    """Referenced blobs the store lacks (missing: exits 1) and blobs nothing references (orphans)."""
    settings = store_settings(ctx.settings)
    client = _redis(settings)
    if client is None and settings.effective_blob_store() == "redis":
        raise ConfigurationError(
            "The store is the platform's Redis: set CIPHERPOOL_BROKER_URL (or _STORE_URL), "
            "or run this where `cipherpool up` runs."
        )
    target = BlobStore(client or redis.Redis(), backend_for(settings, client or redis.Redis()))
    legacy = BlobStore(client) if client is not None and target.kind != "redis" else None
    with session_scope(settings.effective_database_url()) as session:
        refs = referenced(session)
    report = check(refs, target, legacy)
    if ctx.as_json:
        ctx.emit(vars(report) | {"ok": report.ok} | ({} if show_orphans else {"orphans": len(report.orphans)}))
    else:
        click.echo(f"store: {report.store}")
        click.echo(
            f"referenced by the database: {report.referenced}; in the store: {report.stored} blobs, {report.stored_bytes} bytes"
        )
        click.echo(f"missing: {len(report.missing)}")
        for item in report.missing:
            owners = item["referenced_by"]
            click.echo(
                f"  {item['kind']} {item['blob_id']}  referenced by {'; '.join(owners) if isinstance(owners, list) else owners}"
            )
        click.echo(
            f"orphans: {len(report.orphans)} ({report.orphan_bytes} bytes; beat's sweep removes those of "
            "removed key sets and models)"
        )
        if show_orphans:
            for item in report.orphans:
                click.echo(f"  {item['kind']} {item['blob_id']}  {item['size_bytes']} bytes")
        if report.legacy_in_redis:
            click.echo(f"still in the platform's Redis: {report.legacy_in_redis} blobs (`cipherpool store migrate`)")
    if not report.ok:
        click.get_current_context().exit(1)


@store.command("migrate")
@click.option(
    "--delete-source",
    is_flag=True,
    help="Remove each blob from Redis once the store's copy is verified, and unreferenced ones too.",
)
@pass_ctx
def store_migrate(ctx: CliContext, delete_source: bool) -> None:
    """Copy every blob the database references out of the platform's Redis into the configured
    store, verifying each sha256 (safe to run again; resumes where a run stopped)."""
    settings = store_settings(ctx.settings)
    client = _redis(settings)
    if client is None:
        raise ConfigurationError(
            "Nothing to migrate from: set CIPHERPOOL_BROKER_URL (or _STORE_URL) to the Redis "
            "that holds the blobs, or run this while `cipherpool up` runs."
        )
    if settings.effective_blob_store() == "redis":
        raise ConfigurationError(
            "The configured store is the platform's Redis already (CIPHERPOOL_BLOB_STORE=redis, "
            "or a broker URL without CIPHERPOOL_BLOB_STORE): set CIPHERPOOL_BLOB_STORE=fs or s3."
        )
    target = BlobStore(client, backend_for(settings, client))
    with session_scope(settings.effective_database_url()) as session:
        refs = referenced(session)
    report = migrate(
        refs, BlobStore(client), target, delete_source=delete_source, progress=(lambda line: None) if ctx.as_json else click.echo
    )
    ctx.emit(vars(report))
    if report.missing:
        raise NotFound(
            f"{len(report.missing)} referenced blobs are in neither Redis nor the store (`cipherpool store check` lists them)."
        )
