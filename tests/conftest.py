"""Shared fixtures. Unit tests use SQLite and fakes; integration tests (marked) start their
own Redis and `celery worker` processes on free loopback ports and stop them by pid."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from cipherpool.config.settings import Settings, reset_settings
from cipherpool.fhe.process import keep_exit_status


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A test that ran FHE in this process must not turn a failed run into exit status 0:
    concrete's runtime stops itself at exit with exit(0) (cipherpool/fhe/process.py)."""
    keep_exit_status()


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


@pytest.fixture(scope="session")
def postgres_url():
    with _postgres_database() as url:
        yield url


@pytest.fixture
def fresh_postgres_url():
    with _postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, settings) -> str:
    """Each service test runs on SQLite (the default) and on PostgreSQL (by URL)."""
    from sqlmodel import SQLModel

    from cipherpool.db import get_engine, init_db

    url = settings.effective_database_url() if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    init_db(url)
    yield url
    if request.param == "postgresql":
        engine = get_engine(url)
        SQLModel.metadata.drop_all(engine)
        engine.dispose()  # pooled connections hold prepared plans for the dropped tables


@pytest.fixture
def session(db_url):
    from cipherpool.db import session_scope

    with session_scope(db_url) as s:
        yield s
