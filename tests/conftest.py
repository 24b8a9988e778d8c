"""Shared fixtures. Unit tests use SQLite and fakes; integration tests (marked) start their
own Redis and `celery worker` processes on free loopback ports and stop them by pid."""

from __future__ import annotations

import os

import pytest

from cipherpool.config.settings import Settings, reset_settings


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


@pytest.fixture
def db_url(settings) -> str:
    from cipherpool.db import init_db

    url = settings.effective_database_url()
    init_db(url)
    return url


@pytest.fixture
def session(db_url):
    from cipherpool.db import session_scope

    with session_scope(db_url) as s:
        yield s
