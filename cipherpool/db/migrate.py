"""Schema migrations (Alembic), applied from code.

The scripts ship inside the package (``cipherpool/db/migrations``) and are configured here,
with no alembic.ini: ``cipherpool up``, ``cipherpool db upgrade`` and the tests all go
through :func:`upgrade_db`, on the engine of :func:`~cipherpool.db.engine.get_engine` (SQLite
pragmas included).

Three kinds of database meet :func:`upgrade_db`:

* empty: every migration runs, from the baseline on;
* made by ``SQLModel.metadata.create_all`` before migrations existed (our tables, no
  ``alembic_version``): stamped at the baseline, which is that schema, then upgraded, so
  existing data directories keep working;
* versioned: the pending migrations run.

One process migrates at a time: on PostgreSQL a transaction-scoped advisory lock, on SQLite
``BEGIN IMMEDIATE`` (the write lock; the others wait out the busy timeout). Both databases
then apply all pending migrations in one transaction, so a failed one leaves nothing behind.

A schema change is a change to tables.py plus a migration in ``migrations/versions/``, written
with ``alembic revision --autogenerate --rev-id 0002_short_name -m "..."`` from the repository
root (alembic.ini there says how); tests/test_migrations.py fails while the models and the
migrations disagree.

Alembic is imported inside the functions: pool nodes and the gateway import cipherpool.db for
sessions and never migrate, so they do not pay for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from cipherpool.errors import ConfigurationError, InvalidInput

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BASELINE_REVISION = "0001_baseline"
# The schema that create_all made before migrations existed: what the baseline creates.
BASELINE_TABLES = frozenset({"accounts", "models", "access_tokens", "evaluation_keys", "pool_nodes", "workers"})
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock key: one migrator per PostgreSQL database ("cipher" in ASCII).
_PG_LOCK_KEY = 0x636970686572


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade_db` did. ``adopted``: the database predated migrations and was
    stamped at the baseline first (``from_revision`` is then None)."""

    from_revision: str | None
    to_revision: str | None
    adopted: bool = False

    @property
    def changed(self) -> bool:
        return self.adopted or self.from_revision != self.to_revision


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """An Alembic config for our scripts and ``url``; env.py runs on ``connection`` if given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolates %
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision the installed package ships."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def current_revision(url: str) -> str | None:
    """The revision the database is at; None for an empty or pre-migration database."""
    from cipherpool.db.engine import get_engine

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # asking must not create the file
    with get_engine(url).connect() as conn:
        return _current(conn)


def upgrade_db(url: str, revision: str = "head") -> Upgrade:
    """Apply the pending migrations up to ``revision``; running it again is a no-op."""
    from alembic import command
    from alembic.util import CommandError

    from cipherpool.db.engine import get_engine

    with get_engine(url).connect() as conn, _migration_transaction(conn):
        before, adopted = _prepare(conn, url)
        try:
            command.upgrade(alembic_config(url, conn), revision)
        except CommandError as exc:
            raise InvalidInput(f"Cannot upgrade the database from {before or 'empty'} to {revision}: {exc}") from None
        after = _current(conn)
    if adopted or before != after:
        log.info("database migrated: %s -> %s%s", before, after, " (stamped at the baseline first)" if adopted else "")
    return Upgrade(from_revision=before, to_revision=after, adopted=adopted)


def _prepare(conn: Connection, url: str) -> tuple[str | None, bool]:
    """The revision to upgrade from, and whether the database was adopted to get one."""
    before = _current(conn)
    existing = set(inspect(conn).get_table_names())
    if before is None:
        if existing & BASELINE_TABLES:
            _adopt(conn, url, existing)
            return None, True
        return None, False
    if not existing & _our_tables():
        # Our tables were dropped (metadata.drop_all does not know alembic_version): the
        # database holds nothing of ours, so it is built again from the first migration.
        log.warning("database at %s has none of its tables left; migrating it from scratch", before)
        conn.execute(text(f"DELETE FROM {VERSION_TABLE}"))
        return None, False
    _require_known(before)
    return before, False


def _require_known(revision: str) -> None:
    from alembic.util import CommandError

    try:
        _scripts().get_revision(revision)
    except CommandError:
        raise ConfigurationError(
            f"The database is at schema revision {revision}, which this cipherpool does not ship (newest: "
            f"{head_revision()}): it was migrated by a newer version. Run that version, or restore a backup."
        ) from None


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(""))


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _our_tables() -> set[str]:
    return set(SQLModel.metadata.tables) | BASELINE_TABLES


def _adopt(conn: Connection, url: str, existing: set[str]) -> None:
    """Stamp a database that create_all made at the baseline. Half a schema is refused:
    stamping it would leave the missing tables missing for good."""
    from alembic import command

    missing = BASELINE_TABLES - existing
    if missing:
        raise ConfigurationError(
            f"The database has some of cipherpool's tables but not {', '.join(sorted(missing))}, and no "
            f"{VERSION_TABLE} table: it cannot be migrated. Back it up, then point CIPHERPOOL_DATABASE_URL "
            "at an empty database."
        )
    log.info("database predates migrations: stamping it at %s", BASELINE_REVISION)
    command.stamp(alembic_config(url, conn), BASELINE_REVISION)


@contextmanager
def _migration_transaction(conn: Connection) -> Iterator[None]:
    """One transaction around the whole upgrade, holding the database's migration lock.

    SQLite: foreign keys are off for the duration (they can only be switched outside a
    transaction), as SQLite's own procedure for rebuilding a table asks: batch migrations
    copy and drop tables that others point at. ``PRAGMA foreign_key_check`` must then find
    nothing before the commit, and the connection goes back to the pool with them on."""
    sqlite = conn.dialect.name == "sqlite"
    try:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits out the busy timeout for another migrator
        elif conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield
        if sqlite:
            dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if dangling:
                raise RuntimeError(f"a migration left rows whose foreign keys point nowhere: {dangling[:5]}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        if sqlite:
            try:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
            except Exception:
                conn.invalidate()  # never pool a connection that left foreign keys off
