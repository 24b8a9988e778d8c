"""A full Redis (``maxmemory`` with ``noeviction``: writes refused, reads and deletes served),
met by the parts that write to it on every request: the rate limiter counts in the process
instead, a credential change is still made, a key set's use is skipped, readiness says the
store is full, and any write refused anywhere is a typed 507 ``store_full``, never a 502. Each
test fills a redis-server of its own, with a tiny maxmemory, started here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import kombu.exceptions
import pytest
import redis

from cipherpool.config.settings import Settings
from cipherpool.errors import RateLimited, StoreFull
from cipherpool.outages import outage_error
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import Supervisor

MAXMEMORY = 4 * 1024**2
FILLER = 64 * 1024


@dataclass
class Full:
    url: str
    client: redis.Redis

    def fill(self) -> None:
        """Write until Redis refuses even a small write: from here on it is full. (A refused
        large write is not enough: its own argument, counted while it was read, is freed.)"""
        for i in range(10_000):
            try:
                self.client.set(f"filler:{i}", b"x" * FILLER)
            except redis.exceptions.OutOfMemoryError:
                try:
                    self.client.set(f"filler:small:{i}", b"x")
                except redis.exceptions.OutOfMemoryError:
                    return
        raise AssertionError("Redis never filled up")


@pytest.fixture
def full(tmp_path) -> Iterator[Full]:
    supervisor = Supervisor(tmp_path / "logs")
    try:
        _child, url = start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=MAXMEMORY)
        client = redis.Redis.from_url(url)
        client.set("cipherpool:auth-generation", b"7")  # a change counter the guard reads
        yield Full(url, client)
        client.close()
    finally:
        supervisor.stop_all(grace_s=5)


def test_the_rate_limiter_counts_in_the_process_while_redis_refuses_writes(full: Full, caplog):
    from cipherpool.gateway.ratelimit import RateLimiter

    limiter = RateLimiter(full.client, token_rate_per_s=3, account_rate_per_s=100)
    assert limiter.hit("acct", "tok", also_get=["cipherpool:auth-generation"]) == [b"7"]
    full.fill()
    with caplog.at_level(logging.WARNING, logger="cipherpool.gateway"):
        # Then requests pass, the counters are still read, and the token's rate still holds
        answers = [limiter.hit("acct", "tok", also_get=["cipherpool:auth-generation"]) for _ in range(2)]
        assert answers == [[b"7"], [b"7"]]
        with pytest.raises(RateLimited):
            for _ in range(5):  # the window may turn once meanwhile
                limiter.hit("acct", "tok")
    warnings = [r.getMessage() for r in caplog.records if "counting in this gateway process" in r.getMessage()]
    assert len(warnings) == 1  # once for the episode, not per request

    # When memory is freed, counting goes back to Redis, said once
    for name in full.client.scan_iter("filler:*"):
        full.client.delete(name)
    with caplog.at_level(logging.WARNING, logger="cipherpool.gateway"):
        limiter.hit("acct", "other-token")
    assert any("takes writes again" in r.getMessage() for r in caplog.records)
    assert any(k.startswith(b"cipherpool:rate:") for k in full.client.scan_iter("cipherpool:rate:*"))


def test_a_write_refused_anywhere_is_store_full_not_a_502(full: Full, tmp_path):
    from cipherpool.config.celery import create_app

    full.fill()
    with pytest.raises(redis.exceptions.OutOfMemoryError) as refused:
        full.client.incr("cipherpool:auth-generation")
    assert isinstance(outage_error(refused.value), StoreFull)
    # A publish: kombu wraps the refusal in its OperationalError, which is no unreachable broker
    app = create_app(Settings(data_dir=tmp_path / "data", broker_url=full.url))
    with pytest.raises(kombu.exceptions.OperationalError) as wrapped:
        app.send_task("cipherpool.nothing", kwargs={}, queue="cipherpool.test")
    assert isinstance(outage_error(wrapped.value), StoreFull)
    assert outage_error(redis.ConnectionError("refused")).code == "broker_unavailable"  # unchanged

    from cipherpool.dispatch import send_to_node

    with pytest.raises(StoreFull):
        send_to_node(app, "node@test", "cipherpool.nothing")


def test_a_credential_change_stands_and_a_key_use_is_skipped_when_redis_is_full(full: Full, tmp_path, caplog):
    from cipherpool.context import PlatformContext
    from cipherpool.gateway.auth import Authenticator
    from cipherpool.services import keyuse

    ctx = PlatformContext(Settings(data_dir=tmp_path / "data", broker_url=full.url, blob_store="redis"))
    full.fill()
    with caplog.at_level(logging.WARNING):
        Authenticator(ctx).changed()  # the change is committed: its announcement is best effort
        keyuse.record(ctx.store.redis, "token", "ab" * 16)  # never costs a query its answer
    assert any("could not announce" in r.getMessage() for r in caplog.records)
    assert keyuse.pending(ctx.store.redis) == {}
    ctx.store.redis.close()


def test_readiness_reports_a_full_store_and_stays_ready(full: Full, tmp_path):
    from cipherpool.gateway.readiness import Readiness
    from cipherpool.gateway.results import ResultWaiter
    from cipherpool.store import BlobStore

    settings = Settings(data_dir=tmp_path / "data", broker_url=full.url)
    store = BlobStore.from_url(full.url)
    ready = Readiness(settings, None, store, ResultWaiter(full.url))  # type: ignore[arg-type]
    assert ready._fullness() is None
    full.fill()
    reason = ready._fullness()
    assert reason is not None and reason.startswith("full: Redis at maxmemory")
    # A store_full answered by this gateway (any backend) shows too, for a while
    for name in full.client.scan_iter("filler:*"):
        full.client.delete(name)
    assert ready._fullness() is None
    ready.saw_full()
    assert (ready._fullness() or "").startswith("full: a write was refused")
    store.redis.close()
