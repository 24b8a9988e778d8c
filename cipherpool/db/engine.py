"""Engine and sessions. SQLite by default (WAL, busy timeout: several platform processes
write to one file), PostgreSQL or anything SQLAlchemy speaks by URL. The schema is made and
changed by migrations (:mod:`cipherpool.db.migrate`), on the engines made here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from cipherpool.db import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from cipherpool.db.migrate import Upgrade, current_revision, head_revision, upgrade_db

__all__ = ["Upgrade", "current_revision", "get_engine", "head_revision", "init_db", "session_scope", "upgrade_db"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 5


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A database host that does not answer must not hold a request thread for minutes (the
    # drivers' default connect timeout): the caller gets database_unavailable after this long.
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_db(url: str) -> Upgrade:
    """Bring the schema up to date: an alias of :func:`~cipherpool.db.migrate.upgrade_db`
    (to the newest migration), kept under the name that ``up``, ``admin`` and ``db init``
    have always called. Safe to run again; a database made before migrations is adopted."""
    return upgrade_db(url)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on error. Services never commit."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
