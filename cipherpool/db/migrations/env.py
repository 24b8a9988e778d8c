"""Alembic's entry point for cipherpool's migrations.

Run from code by :mod:`cipherpool.db.migrate`, which passes its open connection in
``config.attributes["connection"]``: the engine of :func:`cipherpool.db.get_engine` (SQLite
pragmas: WAL, busy timeout) and the transaction and lock that ``upgrade_db`` holds. Without
one (a developer running ``alembic`` with the repository's alembic.ini) it opens that engine
for ``sqlalchemy.url``, else for the configured platform database.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from cipherpool.db import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _options(dialect_name: str) -> dict[str, Any]:
    """What both modes share. SQLite can ALTER little, so ``op.batch_alter_table`` (and the
    code autogenerate writes) copies the table instead; compare_type makes autogenerate see
    a changed column type, not only added and dropped columns."""
    return {
        "target_metadata": target_metadata,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from cipherpool.config.settings import get_settings

    return get_settings().effective_database_url()


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = _url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(url.split(":", 1)[0]))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from cipherpool.db.engine import get_engine

    with get_engine(_url()).connect() as connection:
        _run(connection)
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
