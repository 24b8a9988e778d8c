"""Readiness and outages, in process: which errors are a dependency's outage (a typed 503
with Retry-After) and which stay faults (502), wherever they are raised (the guard, a
route); /v1/health needing nothing; the readiness checks' schema cache, their bound on a
dependency that hangs, and a result waiter that starts with Redis down. The same against
real processes: tests/integration/test_gateway_outages.py."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import kombu.exceptions
import psycopg
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc

from cipherpool.config.celery import create_app as create_celery
from cipherpool.config.settings import Settings
from cipherpool.db import head_revision, upgrade_db
from cipherpool.errors import BrokerUnavailable, DatabaseUnavailable, RateLimited, RemoteError
from cipherpool.gateway import readiness
from cipherpool.gateway.guard import error_body
from cipherpool.gateway.readiness import READY_CACHE_S, Readiness
from cipherpool.gateway.results import ResultWaiter
from cipherpool.outages import logged_outage, outage_error
from cipherpool.stack.supervisor import free_port
from cipherpool.store import BlobStore

PASSWORD = "not-for-your-eyes"


def closed_redis() -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"


def real_error(url: str, sql: str = "SELECT 1") -> sa_exc.DBAPIError:
    """What SQLAlchemy really raises for ``sql`` on ``url``."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    except sa_exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{sql} on {url} raised nothing")


# ---- which errors are outages ---------------------------------------------------------


def test_a_database_that_refuses_connections_is_database_unavailable():
    refused = real_error(f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:{free_port()}/x")
    assert isinstance(refused, sa_exc.OperationalError)
    typed = outage_error(refused)
    assert isinstance(typed, DatabaseUnavailable) and typed.http_status == 503 and typed.retry_after_s
    assert PASSWORD not in typed.message


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.InterfaceError("SELECT 1", None, Exception("connection already closed")),
        sa_exc.DatabaseError("SELECT 1", None, Exception("server closed the connection"), connection_invalidated=True),
        sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"),
    ],
    ids=["interface", "invalidated", "pool-timeout"],
)
def test_connection_level_database_errors_are_database_unavailable(error: Exception):
    assert isinstance(outage_error(error), DatabaseUnavailable)


def test_a_schema_not_migrated_yet_is_database_unavailable_on_both_databases():
    sqlite = real_error("sqlite://", "SELECT * FROM accounts")  # SQLite says it with an OperationalError
    postgres = sa_exc.ProgrammingError("SELECT ...", None, psycopg.errors.UndefinedTable('relation "accounts"'))
    for error in (sqlite, postgres):
        typed = outage_error(error)
        assert isinstance(typed, DatabaseUnavailable) and "not migrated" in typed.message


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError("INSERT ...", None, Exception("UNIQUE constraint failed")),
        sa_exc.ProgrammingError("SELEC 1", None, psycopg.errors.SyntaxError("syntax error")),
        sa_exc.DatabaseError("SELECT 1", None, Exception("division by zero")),
        redis.ResponseError("WRONGTYPE"),
        ValueError("a bug"),
    ],
    ids=["integrity", "syntax", "data", "redis-response", "bug"],
)
def test_everything_else_stays_a_fault(error: Exception):
    assert outage_error(error) is None


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("Error 111 connecting"),
        redis.TimeoutError("Timeout reading"),
        kombu.exceptions.OperationalError("Error 111 connecting"),
    ],
    ids=["redis", "redis-timeout", "kombu"],
)
def test_redis_and_broker_outages_are_broker_unavailable(error: Exception):
    assert isinstance(outage_error(error), BrokerUnavailable)


def test_an_outage_is_logged_as_one_line_and_a_fault_not_at_all(caplog):
    logger = logging.getLogger("cipherpool.gateway")
    with caplog.at_level(logging.WARNING, logger="cipherpool.gateway"):
        typed = logged_outage(redis.ConnectionError("Error 111 connecting"), "GET", "/v1/models", logger)
        assert logged_outage(ValueError("a bug"), "GET", "/v1/models", logger) is None
    assert isinstance(typed, BrokerUnavailable)
    (record,) = caplog.records
    assert record.getMessage() == "GET /v1/models: broker_unavailable (ConnectionError: Error 111 connecting)"
    assert record.exc_info is None


def test_outages_carry_retry_after_and_faults_do_not():
    assert error_body(DatabaseUnavailable("down"))[1]["retry-after"] == "5"
    assert error_body(BrokerUnavailable("down"))[1]["retry-after"] == "5"
    assert error_body(RateLimited("slow down", retry_after_s=3))[1]["retry-after"] == "3"
    assert "retry-after" not in error_body(RemoteError("bug"))[1]


# ---- through the app: the guard and the routes ----------------------------------------


@pytest.fixture
def app_down(tmp_path: Path) -> Any:
    """The gateway app with its database and Redis on closed ports."""
    from cipherpool.gateway.app import create_app

    settings = Settings(
        data_dir=tmp_path, broker_url=closed_redis(), database_url=f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:{free_port()}/x"
    )
    return create_app(settings)


def test_the_guard_answers_a_database_outage_while_authenticating_with_a_typed_503(app_down):
    from fastapi.testclient import TestClient

    # (exceptions re-raised: one that reached the server's generic handler would fail the test)
    with TestClient(app_down) as client:
        health = client.get("/v1/health")
        answer = client.get("/v1/account", headers={"Authorization": "Bearer cpk_" + "a" * 40})
    assert health.status_code == 200  # liveness needs nothing
    assert answer.status_code == 503 and answer.json()["code"] == "database_unavailable", answer.text
    assert answer.headers["retry-after"] == "5" and PASSWORD not in answer.text


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (lambda: real_error(f"postgresql+psycopg://u@127.0.0.1:{free_port()}/x"), 503, "database_unavailable"),
        (lambda: redis.ConnectionError("Connection closed by server."), 503, "broker_unavailable"),
        (lambda: kombu.exceptions.OperationalError("Error 111"), 503, "broker_unavailable"),
        (lambda: sa_exc.IntegrityError("INSERT", None, Exception("UNIQUE constraint failed")), 502, "remote_error"),
        (lambda: RuntimeError("a bug"), 502, "remote_error"),
    ],
    ids=["database", "redis", "broker", "integrity", "bug"],
)
def test_a_route_that_meets_an_outage_answers_its_typed_503_and_a_bug_stays_502(app_down, monkeypatch, raised, status, code):
    from fastapi.testclient import TestClient

    from cipherpool.gateway.auth import AccountPrincipal
    from cipherpool.gateway.guard import Guard

    def route() -> None:
        raise raised()

    monkeypatch.setattr(Guard, "_admit", staticmethod(lambda _gw, _authorization, _source, _state: AccountPrincipal("a", "p")))
    app_down.add_api_route("/v1/test-raise", route)
    # An outage is answered by its own handler, never re-raised to the server (whose log
    # would then show a traceback per request during an outage); a bug still is.
    with TestClient(app_down, raise_server_exceptions=status == 503) as client:
        answer = client.get("/v1/test-raise", headers={"Authorization": "Bearer cpk_x"})
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert ("retry-after" in answer.headers) == (status == 503)


# ---- the checks -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def readiness_for(tmp_path: Path, clock: Clock, **over: Any) -> tuple[Readiness, str]:
    """Checks on a SQLite database of its own, Redis and the broker on a closed port."""
    url = f"sqlite:///{tmp_path / 'ready.db'}"
    settings = Settings(data_dir=tmp_path, broker_url=closed_redis(), database_url=url, **over)
    celery = create_celery(settings)
    store = BlobStore.from_url(settings.effective_store_url())
    return Readiness(settings, celery, store, ResultWaiter(settings.effective_result_backend()), clock=clock), url


def test_a_schema_behind_head_is_not_ready_and_named_with_both_revisions(tmp_path):
    ready, url = readiness_for(tmp_path, Clock())
    upgrade_db(url, "0001_baseline")

    found = asyncio.run(ready.check())

    assert found["database"].ok
    assert not found["schema"].ok and found["schema"].detail == f"at 0001_baseline, head is {head_revision()}"
    assert not found["broker"].ok and not found["store"].ok
    message = Readiness.summary(found)
    assert message is not None and f"schema at 0001_baseline, head is {head_revision()}" in message
    assert "broker unreachable" in message and "store unreachable" in message
    assert PASSWORD not in message and "127.0.0.1" not in message  # a public answer names no host


def test_an_empty_database_is_not_ready_and_asking_does_not_create_its_file(tmp_path):
    ready, url = readiness_for(tmp_path, Clock())
    found = asyncio.run(ready.check())
    assert not found["database"].ok and not found["schema"].ok
    assert found["schema"].detail.startswith("not migrated (empty database)")
    assert not Path(url.removeprefix("sqlite:///")).exists()


def test_the_result_backend_is_checked_only_when_it_is_a_server_of_its_own(tmp_path):
    shared, _ = readiness_for(tmp_path, Clock())
    own, _ = readiness_for(tmp_path, Clock(), result_backend=closed_redis())
    assert "results" not in asyncio.run(shared.check())
    results = asyncio.run(own.check())["results"]
    assert not results.ok and results.detail == "unreachable (ConnectionError)"


def test_a_schema_at_head_is_trusted_for_the_cache_time_and_a_behind_one_never(tmp_path, monkeypatch):
    clock = Clock()
    ready, url = readiness_for(tmp_path, clock, ready_schema_cache_s=30.0)
    reads: list[str] = []
    real = readiness.current_revision

    def counted(db_url: str) -> str | None:
        reads.append(db_url)
        return real(db_url)

    monkeypatch.setattr(readiness, "current_revision", counted)
    upgrade_db(url, "0001_baseline")

    async def probe() -> bool:
        clock.now += READY_CACHE_S  # past the whole answer's cache: each probe checks again
        return (await ready.check())["schema"].ok

    async def probes() -> list[bool]:
        oks = [await probe() for _ in range(2)]  # behind: read at each probe
        upgrade_db(url)
        oks += [await probe() for _ in range(3)]  # at head: read once
        clock.now += 31
        oks.append(await probe())  # the cache expired: read again
        return oks

    assert asyncio.run(probes()) == [False, False, True, True, True, True]
    assert len(reads) == 4


def test_a_dependency_that_hangs_costs_one_thread_and_a_bounded_wait(tmp_path):
    clock = Clock()
    ready, _ = readiness_for(tmp_path, clock, ready_timeout_s=0.2)
    release = threading.Event()
    calls: list[int] = []

    def hung_store() -> str:
        calls.append(1)
        release.wait(10)
        return "ok"

    ready._ping_store = hung_store  # type: ignore[method-assign]

    async def probe() -> str:
        clock.now += READY_CACHE_S  # past the whole answer's cache: each probe checks again
        return (await ready.check())["store"].detail

    shared: list[int] = []

    async def probes() -> list[str]:
        details = [await probe() for _ in range(3)]
        shared.append(len(calls))  # while the dependency hangs
        release.set()
        await ready._running["store"]  # the one call the three probes shared, now answered
        await asyncio.sleep(0)  # its done-callbacks run
        details.append(await probe())
        return details

    details = asyncio.run(asyncio.wait_for(probes(), 10))
    assert details[:3] == ["no answer within 0.2 s"] * 3
    assert shared == [1]  # the three probes shared one call: a hung dependency costs one thread
    assert details[3] == "ok"


def test_a_flood_of_probes_costs_one_round_of_checks_per_cache_time(tmp_path, monkeypatch):
    clock = Clock()
    ready, url = readiness_for(tmp_path, clock, ready_schema_cache_s=0)
    upgrade_db(url)
    calls: dict[str, int] = {}

    def counted(name: str, answer: Any) -> Any:
        def check(*args: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return answer(*args)

        return check

    ready._database = counted("database", ready._database)  # type: ignore[method-assign]
    ready._broker = counted("broker", lambda: "ok")  # type: ignore[method-assign]
    ready._ping_store = counted("store", lambda: "ok")  # type: ignore[method-assign]
    monkeypatch.setattr(readiness, "current_revision", counted("schema", readiness.current_revision))

    async def flood() -> list[dict[str, Any]]:
        at_once = await asyncio.gather(*(ready.check() for _ in range(25)))  # while the first round runs
        one_by_one = [await ready.check() for _ in range(25)]  # within READY_CACHE_S of its answer
        return [*at_once, *one_by_one]

    answers = asyncio.run(flood())
    assert len(answers) == 50 and all(a == answers[0] and all(c.ok for c in a.values()) for a in answers)
    assert calls == {"database": 1, "schema": 1, "broker": 1, "store": 1}

    clock.now += READY_CACHE_S  # the answer is old: the next probe checks again, once
    asyncio.run(flood())
    assert calls == {"database": 2, "schema": 2, "broker": 2, "store": 2}


def test_the_result_waiter_starts_and_stops_with_redis_down():
    async def lifetime() -> None:
        waiter = ResultWaiter(closed_redis())
        await waiter.start()
        await asyncio.sleep(0.3)  # the reader tries, fails, waits to try again
        await waiter.close()

    asyncio.run(asyncio.wait_for(lifetime(), 10))
