"""The gateway in any start order and through outages, as real processes: its own
redis-server on a free port and the gateway under uvicorn (each started and stopped by its
own pid), against a database that is down, not migrated yet, or fine while Redis restarts.

What a load balancer and a client must see: /v1/health 200 whatever is down, /v1/ready 503
naming the part until it is back (no gateway restart), authenticated calls a typed 503 with
Retry-After meanwhile, and no request lost to a Redis restart."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from cipherpool.config.settings import Settings, settings_env
from cipherpool.db import init_db, session_scope, upgrade_db
from cipherpool.names import QUERY_OWNER_PREFIX
from cipherpool.services.accounts import create_account
from cipherpool.services.tokens import create_token
from cipherpool.stack.embedded import GATEWAY
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import Child, Supervisor, free_port
from cipherpool.waiting import wait_until

pytestmark = pytest.mark.integration
QUERY_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
START_S = 60.0


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(tmp_path / "logs")
    yield s
    s.stop_all()


def start_redis_for(supervisor: Supervisor, tmp_path: Path) -> tuple[Child, str]:
    return start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=64 * 1024**2)


def start_gateway(supervisor: Supervisor, tmp_path: Path, redis_url: str, database_url: str) -> tuple[Child, str]:
    """The gateway as `cipherpool up` runs it (same command, settings in CIPHERPOOL_*), up
    when /v1/health answers: whatever else is down, it must start."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=redis_url, database_url=database_url)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CIPHERPOOL_")}, **settings_env(settings)}
    child = supervisor.start("gateway", GATEWAY + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not child.alive():
            raise AssertionError(f"the gateway exited at start:\n{child.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, START_S, interval_s=0.1)
    return child, url


def restart(supervisor: Supervisor, child: Child, url: str) -> None:
    """Kill redis-server by its pid, start it again with the same config (port, data
    directory, password) and wait until it answers."""
    os.kill(child.pid, signal.SIGKILL)
    child.process.wait(timeout=10)
    supervisor.restart_dead()
    client = redis.Redis.from_url(url, socket_connect_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.ResponseError):
            return False

    try:
        wait_until(answers, 15, interval_s=0.05)
    finally:
        client.close()


def credentials(database_url: str) -> tuple[str, str, str]:
    """An account's API key, and an access token of it (value, id), made through the services."""
    with session_scope(database_url) as session:
        account, api_key = create_account(session, "provider")
        token, value = create_token(session, account, "user")
        return api_key, value, token.id


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def subscribed(redis_url: str) -> bool:
    """Whether a gateway's result reader holds its private channel on this server."""
    client = redis.Redis.from_url(redis_url)
    try:
        return bool(client.pubsub_channels("cipherpool:gateway:*"))
    finally:
        client.close()


def test_a_database_down_leaves_the_gateway_alive_not_ready_and_answering_a_typed_503(tmp_path, supervisor):
    # Given Redis, and a PostgreSQL URL on a port where nothing listens (with a password that must not leak)
    _redis, redis_url = start_redis_for(supervisor, tmp_path)
    closed = f"postgresql+psycopg://cipherpool:s3cret-pw@127.0.0.1:{free_port()}/cipherpool"

    # When the gateway starts against them
    gateway, url = start_gateway(supervisor, tmp_path, redis_url, closed)
    with httpx.Client(base_url=url, timeout=30) as http:
        health = http.get("/v1/health")
        ready = http.get("/v1/ready")
        account = http.get("/v1/account", headers=bearer("cpk_" + "a" * 40))
        query = http.get(f"/v1/queries/{QUERY_ID}", headers=bearer("cpt_" + "b" * 40))

    # Then it is alive, not ready because of the database (the rest answers)
    assert health.status_code == 200
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["code"] == "not_ready" and body["message"].startswith("database unreachable")
    assert not body["checks"]["database"]["ok"] and not body["checks"]["schema"]["ok"]
    assert body["checks"]["broker"]["ok"] and body["checks"]["store"]["ok"]
    assert "s3cret-pw" not in ready.text and str(urlsplit(redis_url).password) not in ready.text
    # and a provider's or an end user's call is a typed 503 with Retry-After, not a 502
    for answer in (account, query):
        assert answer.status_code == 503, answer.text
        assert answer.json()["code"] == "database_unavailable"
        assert int(answer.headers["retry-after"]) >= 1
        assert "s3cret-pw" not in answer.text
    assert gateway.alive()


def test_a_schema_migrated_after_the_gateway_started_makes_it_ready_without_a_restart(tmp_path, supervisor, fresh_postgres_url):
    # Given a gateway started on a fresh PostgreSQL database that nobody migrated yet
    _redis, redis_url = start_redis_for(supervisor, tmp_path)
    gateway, url = start_gateway(supervisor, tmp_path, redis_url, fresh_postgres_url)
    with httpx.Client(base_url=url, timeout=30) as http:
        before = http.get("/v1/ready")
        call = http.get("/v1/account", headers=bearer("cpk_" + "a" * 40))

        # Then it is not ready because of the schema (the database itself answers),
        # and a call meanwhile is a typed 503
        assert before.status_code == 503, before.text
        checks = before.json()["checks"]
        assert checks["database"]["ok"] and not checks["schema"]["ok"]
        assert before.json()["message"].startswith("schema not migrated"), before.text
        assert call.status_code == 503 and call.json()["code"] == "database_unavailable", call.text

        # When the operator migrates it
        upgrade_db(fresh_postgres_url)
        api_key, _, _ = credentials(fresh_postgres_url)

        # Then the same gateway process is ready (once its cached answer, at most a second old, is
        # renewed) and serves
        after = wait_until(lambda: (r := http.get("/v1/ready")).status_code == 200 and r, 15, interval_s=0.2)
        assert after.status_code == 200, after.text
        assert after.json()["status"] == "ready" and after.json()["checks"]["schema"]["detail"].endswith("(head)")
        served = http.get("/v1/account", headers=bearer(api_key))
        assert served.status_code == 200, served.text
    assert gateway.alive() and gateway.process.returncode is None


def test_a_redis_restart_costs_no_request(tmp_path, supervisor):
    # Given a serving gateway on SQLite, an account and a token, and a query of the token's
    redis_child, redis_url = start_redis_for(supervisor, tmp_path)
    database_url = f"sqlite:///{tmp_path / 'data' / 'cipherpool.db'}"
    init_db(database_url)
    api_key, token, token_id = credentials(database_url)
    owner = redis.Redis.from_url(redis_url)
    owner.set(QUERY_OWNER_PREFIX + QUERY_ID, token_id)
    _gateway, url = start_gateway(supervisor, tmp_path, redis_url, database_url)
    # Each kind goes through another Redis client of the gateway's: the guard's rate counter
    # (sync pool), the store (sync: the token list's counts), the result waiter (asyncio: the
    # polls, their owner's read too) and the broker (kombu's publish).
    calls = [
        ("GET", "/v1/account", api_key),
        ("GET", "/v1/tokens", api_key),
        ("GET", f"/v1/queries/{QUERY_ID}", token),
        ("DELETE", f"/v1/queries/{QUERY_ID}", token),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:

        def call(i: int) -> httpx.Response:
            method, path, credential = calls[i % len(calls)]
            return http.request(method, path, headers=bearer(credential))

        with ThreadPoolExecutor(8) as pool:  # every pool holds a few connections now
            warm = list(pool.map(call, range(32)))
        assert [r.text for r in warm if r.status_code not in (200, 202, 204)] == []

        # When Redis is killed and started again on the same port, data directory and password
        restart(supervisor, redis_child, redis_url)
        owner.set(QUERY_OWNER_PREFIX + QUERY_ID, token_id)  # in case the append-only file had not got it

        # Then the next 10 requests all succeed, on whatever connections the gateway held
        answers = [call(i) for i in range(10)]
    failed = [
        (r.request.method, r.request.url.path, r.status_code, r.text[:200])
        for r in answers
        if r.status_code not in (200, 202, 204)
    ]
    assert failed == []
    # and the result waiter subscribed again by itself
    wait_until(lambda: subscribed(redis_url), 10, interval_s=0.1)
    owner.close()


def test_a_gateway_started_before_redis_serves_once_redis_is_up(tmp_path, supervisor):
    # Given Redis down (started once for its port and password, then killed) and a migrated database
    redis_child, redis_url = start_redis_for(supervisor, tmp_path)
    os.kill(redis_child.pid, signal.SIGKILL)
    redis_child.process.wait(timeout=10)
    database_url = f"sqlite:///{tmp_path / 'data' / 'cipherpool.db'}"
    init_db(database_url)
    api_key, _, _ = credentials(database_url)

    # When the gateway starts (its lifespan starts the result waiter, which needs Redis)
    gateway, url = start_gateway(supervisor, tmp_path, redis_url, database_url)
    with httpx.Client(base_url=url, timeout=30) as http:
        # Then it is up but not ready, naming what is down, and a call is a typed 503
        ready = http.get("/v1/ready")
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert checks["database"]["ok"] and checks["schema"]["ok"]
        assert not checks["broker"]["ok"] and not checks["store"]["ok"]
        call = http.get("/v1/account", headers=bearer(api_key))
        assert call.status_code == 503 and call.json()["code"] == "broker_unavailable", call.text
        assert int(call.headers["retry-after"]) >= 1

        # When Redis comes up on its port
        supervisor.restart_dead()

        # Then the same gateway becomes ready, serves, and its result reader subscribes
        wait_until(lambda: http.get("/v1/ready").status_code == 200, 15, interval_s=0.2)
        assert http.get("/v1/account", headers=bearer(api_key)).status_code == 200
        wait_until(lambda: subscribed(redis_url), 10, interval_s=0.1)
    assert gateway.alive()


def test_a_full_redis_refuses_uploads_with_507_and_the_platform_stays_up(tmp_path, supervisor):
    """Issue 23's measurement: one token filling Redis (blobs in Redis, a tiny maxmemory)
    made the next upload a 404 upload_not_found and every authenticated request of every
    account a 502 (the rate limiter's write refused). Now the upload gets 507 store_full, and
    reads, polls, management and deleting a token keep working; readiness says the store is full."""
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import models

    # Given a gateway on a Redis of 16 MiB that holds the blobs, and an end user of a model
    _redis, redis_url = start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=16 * 1024**2)
    database_url = f"sqlite:///{tmp_path / 'data' / 'cipherpool.db'}"
    init_db(database_url)
    with session_scope(database_url) as session:
        account, api_key = create_account(session, "provider")
        models.deploy_model(session, account, "m", models.Artifact("c" * 64, "s" * 64, 1, 1, Versions.installed()))
        token, value = create_token(session, account, "user", "m")
        token_id = token.id
    _gateway, url = start_gateway(supervisor, tmp_path, redis_url, database_url)
    key = (0).to_bytes(4, "little") + (256 * 1024).to_bytes(4, "little")  # a framed 2 MiB evaluation key
    with httpx.Client(base_url=url, timeout=30) as http:
        # When the token uploads key sets of 2 MiB until Redis is full
        answers = []
        for i in range(12):
            answer = http.put(f"/v1/client/keys/{i:032x}", headers=bearer(value), content=key + bytes([i]) * (2 * 1024**2))
            answers.append((answer.status_code, answer.json().get("code")))
            if answer.status_code != 201:
                break
        # Then the first refused upload is a 507 store_full, after some that were stored
        assert answers[-1] == (507, "store_full"), answers
        assert len(answers) > 2 and set(answers[:-1]) == {(201, None)}, answers
        # and every other call is served: provider reads, the end user's reads and polls
        for credential, path in [
            (api_key, "/v1/account"),
            (api_key, "/v1/tokens"),
            (api_key, "/v1/models"),
            (value, "/v1/client/models"),
            (value, "/v1/client/keys"),
        ]:
            assert http.get(path, headers=bearer(credential)).status_code == 200, path
        poll = http.get(f"/v1/queries/{QUERY_ID}", headers=bearer(value))
        assert (poll.status_code, poll.json()["code"]) == (404, "query_not_found")
        # readiness: still ready (traffic must keep coming), degraded, the store full
        ready = http.get("/v1/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
        assert ready.json()["checks"]["store"]["full"] is True
        assert http.get("/v1/health").status_code == 200
        # and the provider can delete the token (whose key sets leave with beat's key sweep)
        assert http.delete(f"/v1/tokens/{token_id}", headers=bearer(api_key)).status_code == 204
        gone = http.get("/v1/client/models", headers=bearer(value))
        assert (gone.status_code, gone.json()["code"]) == (401, "invalid_token")
