"""Shared fixtures, the tiers of the suite and the order they run in.

Tiers (markers registered in pyproject.toml; the ``security`` and ``postgres`` marks are put on
here, at collection, so no test file has to remember them):

* unit: ``tests/test_*.py``, unmarked. SQLite, fakes, in-process gateways, a Redis of their own.
* ``security``: everything under ``tests/security`` (``test_front_door.py`` is also
  ``integration``: it runs a real stack).
* ``integration``: ``tests/integration``: real Redis, real ``celery worker`` processes and
  real concrete-ml models, started on free loopback ports and stopped by pid.
* ``postgres``: the PostgreSQL variant of any test (a fixture parameter ``"postgresql"``, or a
  PostgreSQL fixture of this file), in any tier. Part of the default run, so CI runs them;
  ``scripts/test.sh --fast`` leaves them out, with ``integration``.

A whole run goes unit -> security -> integration (:func:`pytest_collection_modifyitems`), so a
broken unit is reported in seconds, not after the integration tests.

Databases. Migrations run once per session (per xdist worker: scripts/test.sh runs the unit
and security tiers on several processes, one file per process at a time) and per backend,
never per test:

* SQLite: one template file is migrated at the start; a test's database is a byte copy of it
  at the very URL the test used before (``settings.effective_database_url()``, or the path a
  fixture names), so code that opens its own engines by URL (:func:`cipherpool.db.get_engine`,
  cached per URL) finds a freshly migrated database. Each copy's engine is disposed after
  the test.
* PostgreSQL: one database per session, migrated once (``postgres_url``). Before each test
  (``clean_postgres_url``) every table but ``alembic_version`` is emptied children-first in
  one transaction, the rows the migrations left are put back (none today: the snapshot is
  taken right after migrating, so a seeding migration is covered) and every sequence is set
  back to where the migrations left it, as ``TRUNCATE ... RESTART IDENTITY`` would. Measured
  on the loopback server (18 tables): this clean-up about 2 ms; TRUNCATE about 180 ms (file
  work per table); CREATE DATABASE ... TEMPLATE about 300 ms plus its DROP; migrating 0.5 to
  0.8 s. A test leaving a transaction that holds rows makes the next clean-up wait: after
  ``lock_timeout`` the leftovers' connections are terminated and it runs again.

Why not one transaction rolled back (or a SAVEPOINT) per test: the code under test opens its
own connections by URL, commits its own units of work (``session_scope``), and several tests
run threads or child processes on the same database; an outer transaction on one connection
would isolate none of that. "Rolled back per test" is therefore: every test starts from the
migrated state and no test sees another's rows.

Databases of their own, on purpose: the migrations' tests (``tests/test_migrations.py``,
``fresh_postgres_url``), readiness's schema-behind tests, and module-scoped gateways
(``_postgres_database()``, one per module and backend).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cipherpool.config.settings import Settings, reset_settings
from cipherpool.fhe.process import keep_exit_status

TESTS = Path(__file__).resolve().parent
# Fixtures that put a test on the loopback PostgreSQL server (the `postgres` marker).
POSTGRES_FIXTURES = frozenset({"postgres_url", "clean_postgres_url", "fresh_postgres_url"})
UNIT, SECURITY, INTEGRATION = 0, 1, 2
# The database of the loopback Redis (127.0.0.1:6379) that tests flush: one per xdist worker
# (13, 12, 11...; 13 in a plain run), so that files running side by side never flush each other's.
REDIS_TEST_DB = 13 - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 8


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A test that ran FHE in this process must not turn a failed run into exit status 0:
    concrete's runtime stops itself at exit with exit(0) (cipherpool/fhe/process.py)."""
    keep_exit_status()


def _runs_on_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(isinstance(v, str) and v == "postgresql" for v in callspec.params.values()):
        return True
    return bool(POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())))


# Integration files that take longest, run first: with the tier on two processes (scripts/test.sh),
# a long file started last would leave one process idle while the other finishes it.
LONG_FIRST = (
    "test_tutorials_all.py",
    "test_demo.py",
    "test_hosts_apart.py",
    "test_autoscale.py",
    "test_examples.py",
    "test_lifecycle.py",
    "test_bad_input.py",
)


def _order(item: pytest.Item) -> tuple[int, int]:
    tier = _tier(item)
    name = Path(str(item.path)).name
    return tier, LONG_FIRST.index(name) if tier == INTEGRATION and name in LONG_FIRST else len(LONG_FIRST)


def _tier(item: pytest.Item) -> int:
    path = Path(str(item.path))
    if path.is_relative_to(TESTS / "security"):
        return SECURITY
    if path.is_relative_to(TESTS / "integration") or item.get_closest_marker("integration"):
        return INTEGRATION
    return UNIT


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Marks first (so that ``-m`` selects on them), then, once pytest has deselected and
    grouped the items by fixture, orders the run by tier: unit, security, integration. The
    sort is stable: within a tier, files and parameters keep pytest's order, but for the long
    integration files, which come first (``LONG_FIRST``)."""
    for item in items:
        path = Path(str(item.path))
        if path.is_relative_to(TESTS / "security"):
            item.add_marker(pytest.mark.security)
        if path.is_relative_to(TESTS / "integration") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        if _runs_on_postgres(item):
            item.add_marker(pytest.mark.postgres)
    result = yield
    items[:] = sorted(items, key=_order)
    return result


@pytest.fixture(autouse=True, scope="session")
def _clean_environment(tmp_path_factory):
    """No CIPHERPOOL_* from the developer's shell; concrete's temp files in our own dir."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CIPHERPOOL_")}
    tmp = tmp_path_factory.mktemp("tmpdir")
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    reset_settings()
    yield
    os.environ.update(saved)
    if old_tmp is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_tmp
    reset_settings()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


# -- SQLite: one migrated template per session, a copy per test ------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    """A SQLite file migrated to head once per session, everything in the main file (WAL
    checkpointed, engine disposed) so that a plain file copy is the whole database."""
    from cipherpool.db import get_engine, init_db

    path = tmp_path_factory.mktemp("sqlite-template") / "migrated.db"
    url = f"sqlite:///{path}"
    init_db(url)
    engine = get_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal} still holds pages the copy would miss"
    return path


@pytest.fixture
def migrated_sqlite(_sqlite_template) -> Iterator[Callable[[str], str]]:
    """``migrated_sqlite(url)``: puts a freshly migrated database at a ``sqlite:///`` URL's
    file (a copy of the session's template) and returns the URL; engines disposed after."""
    from cipherpool.db import get_engine

    made: list[str] = []

    def copy(url: str) -> str:
        assert url.startswith("sqlite:///"), url
        path = Path(url.removeprefix("sqlite:///"))
        assert not path.exists(), f"{path} exists already: copy the template before anything opens it"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_sqlite_template, path)
        made.append(url)
        return url

    yield copy
    for url in made:
        get_engine(url).dispose()


# -- PostgreSQL: one migrated database per session, emptied before each test -----------------


POSTGRES_ADMIN_URL = os.environ.get("CIPHERPOOL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _postgres_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(POSTGRES_ADMIN_URL.replace("+psycopg", ""))
    try:
        import psycopg  # noqa: F401

        with socket.create_connection((parsed.hostname, parsed.port or 5432), timeout=0.5):
            return True
    except (ImportError, OSError):
        return False


@contextmanager
def _postgres_database():
    """A throw-away PostgreSQL database on the loopback server, dropped afterwards."""
    if not _postgres_reachable():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (the SQLite variant still runs)")
    import uuid

    from sqlalchemy import create_engine, text

    from cipherpool.db import get_engine

    name = f"cipherpool_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        get_engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class _MigratedPostgres:
    """The session's migrated database and how to bring it back to just-migrated."""

    LOCK_TIMEOUT = "5s"

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from cipherpool.db import get_engine, init_db
        from cipherpool.db.migrate import VERSION_TABLE

        init_db(url)
        get_engine(url).dispose()
        self.url = url
        # A connection of our own (not get_engine's: tests dispose that one), kept for the session.
        self.engine = sa.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        with self.engine.connect() as conn:
            metadata = sa.MetaData()
            metadata.reflect(conn)
            self.tables = [t for t in metadata.sorted_tables if t.name != VERSION_TABLE]  # parents first
            self.seed: dict[str, list[dict[str, Any]]] = {}
            for table in self.tables:
                rows = [dict(r._mapping) for r in conn.execute(sa.select(table))]
                if rows:
                    self.seed[table.name] = rows
            sequences = conn.execute(
                sa.text(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), start_value, last_value "
                    "FROM pg_sequences WHERE schemaname = current_schema()"
                )
            ).all()
        quote = self.engine.dialect.identifier_preparer.format_table
        deletes = [f"DELETE FROM {quote(t)}" for t in reversed(self.tables)]  # children first
        # A never-used sequence goes back to its start value, not yet called: nextval gives start.
        setvals = [
            f"setval('{name}', {last if last is not None else start}, {'true' if last is not None else 'false'})"
            for name, start, last in sequences
        ]
        self.empty_sql = "; ".join(deletes)
        self.sequences_sql = f"SELECT {', '.join(setvals)}" if setvals else ""

    def reset(self) -> str:
        from sqlalchemy.exc import OperationalError

        try:
            self._reset()
        except OperationalError as exc:
            if "lock" not in str(exc).lower():
                raise
            self._terminate_others()  # a transaction left open by an earlier test holds rows
            self._reset()
        return self.url

    def _reset(self) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{self.LOCK_TIMEOUT}'")
            conn.exec_driver_sql(self.empty_sql)
            for table in self.tables:  # parents first
                if table.name in self.seed:
                    conn.execute(sa.insert(table), self.seed[table.name])
            if self.sequences_sql:
                conn.exec_driver_sql(self.sequences_sql)

    def _terminate_others(self) -> None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(scope="session")
def _migrated_postgres() -> Iterator[_MigratedPostgres]:
    with _postgres_database() as url:
        db = _MigratedPostgres(url)
        try:
            yield db
        finally:
            db.close()


@pytest.fixture(scope="session")
def postgres_url(_migrated_postgres) -> str:
    """The session's PostgreSQL database, migrated to head (tests take it through
    ``clean_postgres_url``: emptied first)."""
    return _migrated_postgres.url


@pytest.fixture
def clean_postgres_url(_migrated_postgres) -> Iterator[str]:
    """The session's migrated PostgreSQL database, as the migrations left it: no row of an
    earlier test, sequences back at their start. Its engine is disposed after the test."""
    from cipherpool.db import get_engine

    url = _migrated_postgres.reset()
    yield url
    get_engine(url).dispose()


@pytest.fixture
def fresh_postgres_url():
    """An empty database of the test's own (not migrated): for tests of the migrations."""
    with _postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, settings) -> str:
    """Each service test runs on SQLite (the default) and on PostgreSQL (by URL), each time on
    a freshly migrated database (see the module's docstring for how that stays cheap)."""
    if request.param == "sqlite":
        return request.getfixturevalue("migrated_sqlite")(settings.effective_database_url())
    return request.getfixturevalue("clean_postgres_url")


@pytest.fixture
def session(db_url):
    from cipherpool.db import session_scope

    with session_scope(db_url) as s:
        yield s
