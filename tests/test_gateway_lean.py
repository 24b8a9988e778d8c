"""A leaner query path through the gateway (issue 27): what was cut, and that nothing it did
is lost.

* a query published inside :meth:`ResultWaiter.watch`, once its subscription is confirmed, is
  answered by the result's message alone: its key is not read first (a round trip that, for a
  query just published, finds nothing), but still after a message lost meanwhile (the fallback
  poll) and at the deadline; a task published *before* anyone waits (``wait``) is read first;
* a task id from :meth:`ResultWaiter.new_id` is heard through the waiter's one pattern
  subscription: no SUBSCRIBE, no UNSUBSCRIBE, no confirmation to wait for; others' ids are
  subscribed to as before;
* a delivered result's life is shortened off the answer's path, several in one round trip,
  and whatever is pending when the waiter closes is shortened then;
* the guard admits a cached credential on the event loop (its rate counted and the change
  counters read through the result waiter's asyncio client): no thread-pool hop; one it has
  not cached still goes through the thread pool (a database lookup);
* the route dependencies are coroutines: FastAPI runs a plain ``def`` dependency in its thread
  pool, a thread hop per dependency per request; the query routes have none (they read their
  caller directly) and are the first routers FastAPI tries, and FastAPI's OpenTelemetry check
  runs only when ``gateway_telemetry`` asks for it;
* the quota's scripts run by digest (EVALSHA), and are sent whole again when Redis does not
  know them (a restart, a SCRIPT FLUSH): the same answers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
import time
import uuid
from collections.abc import Iterator

import msgpack
import pytest
import redis

from cipherpool import errors
from cipherpool.gateway import deps, results
from cipherpool.gateway.results import ResultWaiter
from cipherpool.names import INFLIGHT_INDEX_KEY, INFLIGHT_PREFIX, QUERY_OWNER_PREFIX, RESULT_META_PREFIX, USAGE_PREFIX
from cipherpool.services import usage
from tests.helpers import own_redis
from tests.test_operator_metrics import KEY_ID, QUOTA, world  # noqa: F401 - the real gateway in-process, on its own Redis


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "lean") as found:
        yield found


def done(task_id: str) -> bytes:
    return msgpack.packb({"status": "SUCCESS", "result": {"ok": True, "value": {}}, "task_id": task_id}, use_bin_type=True)


class Counting(ResultWaiter):
    """A waiter that counts its reads of result keys."""

    reads = 0

    async def meta(self, task_id: str) -> results.TaskMeta | None:
        self.reads += 1
        return await super().meta(task_id)


def thread_hops(module: object, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions ``module`` sends to the thread pool from now on, in order."""
    hops: list[str] = []
    real = module.run_in_threadpool  # type: ignore[attr-defined]

    async def counted(fn, *args, **kwargs):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(module, "run_in_threadpool", counted)
    return hops


def run(url: str, body) -> object:
    async def main() -> object:
        waiter = Counting(url)
        await waiter.start()
        try:
            return await asyncio.wait_for(body(waiter, redis.Redis.from_url(url)), 60)
        finally:
            await waiter.close()

    return asyncio.run(main())


def test_a_query_published_inside_a_confirmed_watch_is_answered_by_its_message_alone(url, monkeypatch):
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 15.0)  # a slow machine's message still comes first
    monkeypatch.setattr(results, "SUBSCRIBE_TIMEOUT_S", 60.0)  # and its confirmation too (a loaded machine took over 5 s)

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, int, bool]:
        await asyncio.wait_for(_until(lambda: waiter._pattern_live), 30)  # the reader is up (else it polls)
        async with waiter.watch("q1") as watch:
            raw = done("q1")  # what a node does: store the result, then publish it
            client.set(RESULT_META_PREFIX + "q1", raw, ex=60)
            client.publish(RESULT_META_PREFIX + "q1", raw)
            meta = await watch.result(5)
        return meta, waiter.reads, watch.subscribed

    meta, reads, subscribed = run(url, body)
    assert subscribed and isinstance(meta, dict) and meta["status"] == "SUCCESS"
    assert reads == 0


def test_a_result_message_is_taken_as_it_came_never_formatted_for_a_log_line(url, monkeypatch, caplog):
    """redis-py's own handler of a RESP3 push message builds a debug line of the whole message
    (a 164 KB answer: about 1 ms of the gateway's CPU) before asking whether to log it: the
    waiter's handler takes the message as it came."""
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 15.0)
    big = {"status": "SUCCESS", "result": {"ok": True, "value": b"\x01" * 200_000}, "task_id": "q-big"}

    async def body(waiter: Counting, client: redis.Redis) -> object:
        await asyncio.wait_for(_until(lambda: waiter._pattern_live), 30)
        async with waiter.watch("q-big") as watch:
            raw = msgpack.packb(big, use_bin_type=True)
            client.set(RESULT_META_PREFIX + "q-big", raw, ex=60)
            client.publish(RESULT_META_PREFIX + "q-big", raw)
            return await watch.result(5)

    with caplog.at_level(logging.DEBUG, logger="push_response"):
        meta = run(url, body)
    assert isinstance(meta, dict) and meta["result"]["value"] == big["result"]["value"]
    assert not [r for r in caplog.records if r.name == "push_response"]


def test_a_watch_as_the_waiter_starts_opens_no_connection_of_its_own(url, monkeypatch):
    """A request that arrives as the gateway starts, while the reader opens its connection.
    redis-py's PubSub opens its connection on its first command, so a SUBSCRIBE then opened a
    second one, and the one the reader kept was not the watch's: the watch waited out its
    confirmation (CI's run of the test above waited 60 s). Now the watch polls meanwhile: it
    never sends a command on a PubSub with no connection. Here the reader's connection is slow
    to open, which made the watch's the one lost, every time."""
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 0.1)
    client = redis.Redis.from_url(url)

    async def main() -> tuple[object, bool, list[bool]]:
        waiter = Counting(url)
        pool = waiter._redis.connection_pool
        fetch, taken, sent = pool.get_connection, [], []
        subscribe = waiter._pubsub.subscribe

        async def the_first_is_slow(*args: object, **kwargs: object) -> object:
            taken.append(1)
            if len(taken) == 1:
                await asyncio.sleep(0.2)
            return await fetch(*args, **kwargs)

        async def recorded(*channels: object) -> None:
            sent.append(waiter._pubsub.connection is not None)
            await subscribe(*channels)

        monkeypatch.setattr(pool, "get_connection", the_first_is_slow)
        monkeypatch.setattr(waiter._pubsub, "subscribe", recorded)
        await waiter.start()
        try:
            await asyncio.sleep(0)  # the reader's first connect begins
            async with waiter.watch("q0") as watch:
                client.set(RESULT_META_PREFIX + "q0", done("q0"), ex=60)
                client.publish(RESULT_META_PREFIX + "q0", done("q0"))
                meta = await watch.result(5)
            await asyncio.wait_for(_until(lambda: waiter._pattern_live), 30)
            return meta, watch.subscribed, sent
        finally:
            await waiter.close()

    meta, subscribed, sent = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(meta, dict) and meta["status"] == "SUCCESS" and not subscribed
    assert sent and all(sent)  # the reader's own SUBSCRIBE, on its connection; none before it


def test_a_watch_while_the_reader_reconnects_polls_and_opens_no_connection_of_its_own(url, monkeypatch):
    """Between a dropped connection and the reader's reconnect, a watch does not subscribe: a
    SUBSCRIBE would connect beside the reader (whose own reconnect then replaces that socket,
    and the confirmation with it) and wait out a connect in an outage. It reads the key
    instead, as when a subscribe fails; an id of the waiter's own is no exception."""

    async def body(waiter: Counting, client: redis.Redis) -> tuple[list[object], list[bool], int]:
        await asyncio.wait_for(_until(lambda: waiter._pattern_live), 10)
        subscribes: list[object] = []

        async def subscribe(*channels: object) -> None:
            subscribes.append(channels)

        holding = asyncio.Event()

        async def held(**_options: object) -> None:  # the reader, before its next read reconnects
            holding.set()
            await asyncio.sleep(60)

        monkeypatch.setattr(waiter._pubsub, "subscribe", subscribe)
        monkeypatch.setattr(waiter._pubsub, "get_message", held)
        await asyncio.wait_for(holding.wait(), 30)  # the reader's read under way ended
        await waiter._pubsub.connection.disconnect()
        assert not waiter._pubsub.connection.is_connected
        metas, subscribed = [], []
        for task_id in ("q9", waiter.new_id()):
            client.set(RESULT_META_PREFIX + task_id, done(task_id), ex=60)
            async with waiter.watch(task_id) as watch:
                metas.append(await watch.result(5))
            subscribed.append(watch.subscribed)
        return metas, subscribed, subscribes

    metas, subscribed, subscribes = run(url, body)
    assert subscribes == [] and subscribed == [False, False], (subscribes, subscribed)
    assert all(isinstance(meta, dict) and meta["status"] == "SUCCESS" for meta in metas)


def test_a_wait_that_ends_while_the_reader_reconnects_unsubscribes_without_connecting(url, monkeypatch):
    """Its channel is dropped from what the reader subscribes to again, not unsubscribed on a
    connection of its own."""
    monkeypatch.setattr(results, "SUBSCRIBE_TIMEOUT_S", 0.2)  # the held reader reads no confirmation

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, bool, bool, list[object]]:
        await asyncio.wait_for(_until(lambda: waiter._pattern_live), 10)

        holding = asyncio.Event()

        async def held(**_options: object) -> None:
            holding.set()
            await asyncio.sleep(60)

        monkeypatch.setattr(waiter._pubsub, "get_message", held)
        await asyncio.wait_for(holding.wait(), 30)  # the reader's read under way ended
        async with waiter.watch("q7") as watch:  # subscribed on the reader's connection
            assert b"celery-task-meta-q7" in waiter._pubsub.channels
            await waiter._pubsub.connection.disconnect()
            client.set(RESULT_META_PREFIX + "q7", done("q7"), ex=60)
            meta = await watch.result(5)
        channels = list(waiter._pubsub.channels)
        return meta, waiter._pubsub.connection.is_connected, b"celery-task-meta-q7" in channels, channels

    meta, connected, kept, channels = run(url, body)
    assert isinstance(meta, dict) and meta["status"] == "SUCCESS"
    assert not connected and not kept and len(channels) == 1  # the reader's private channel alone


def test_a_watch_while_the_first_connection_hangs_polls_at_once(url, monkeypatch):
    """A gateway started in an outage: its reader's first connect may take the connect timeout
    (or longer, to a host that accepts and never answers). Requests meanwhile do not queue
    behind it: they poll."""

    async def main() -> tuple[object, bool, float]:
        waiter = Counting(url)
        hanging = asyncio.Event()

        async def connect() -> None:
            hanging.set()
            await asyncio.sleep(60)

        monkeypatch.setattr(waiter._pubsub, "connect", connect)
        await waiter.start()
        try:
            await asyncio.wait_for(hanging.wait(), 30)
            redis.Redis.from_url(url).set(RESULT_META_PREFIX + "q6", done("q6"), ex=60)
            started = asyncio.get_running_loop().time()
            async with waiter.watch(waiter.new_id()) as other, waiter.watch("q6") as watch:
                meta = await watch.result(5)
            assert not other.subscribed
            return meta, watch.subscribed, asyncio.get_running_loop().time() - started
        finally:
            await waiter.close()

    meta, subscribed, took = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(meta, dict) and meta["status"] == "SUCCESS" and not subscribed
    assert took < 4.0  # not the 5 s confirmation wait, nor the hanging connect


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_lost_message_is_still_found_by_the_fallback_poll(url, monkeypatch):
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 0.1)

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, int]:
        async with waiter.watch("q2") as watch:
            client.set(RESULT_META_PREFIX + "q2", done("q2"), ex=60)  # stored, its message lost
            meta = await watch.result(5)
        return meta, waiter.reads

    meta, reads = run(url, body)
    assert isinstance(meta, dict) and meta["status"] == "SUCCESS" and reads >= 1


def test_a_wait_that_ends_unanswered_reads_the_latest_state(url, monkeypatch):
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 0.1)

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, int]:
        client.set(RESULT_META_PREFIX + "q3", msgpack.packb({"status": "STARTED"}), ex=60)
        async with waiter.watch("q3") as watch:
            meta = await watch.result(0.25)
        return meta, waiter.reads

    meta, reads = run(url, body)
    assert meta == {"status": "STARTED"} and reads >= 1
    # No time to wait: the key is read at once, as before.
    meta, reads = run(url, lambda waiter, _client: _zero(waiter, "q3"))
    assert meta == {"status": "STARTED"} and reads == 1


async def _zero(waiter: Counting, task_id: str) -> tuple[object, int]:
    async with waiter.watch(task_id) as watch:
        meta = await watch.result(0)
    return meta, waiter.reads


def test_wait_reads_a_result_published_before_anyone_waited(url):
    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, int]:
        client.set(RESULT_META_PREFIX + "q4", done("q4"), ex=60)  # finished, its message long gone
        meta = await waiter.wait("q4", 5)
        return meta, waiter.reads

    meta, reads = run(url, body)
    assert isinstance(meta, dict) and meta["status"] == "SUCCESS" and reads == 1


def test_a_watch_whose_subscription_failed_reads_the_key_first(url, monkeypatch):
    async def refused(*_channels: object) -> None:
        raise redis.ConnectionError("reconnecting")

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, bool]:
        monkeypatch.setattr(waiter._pubsub, "subscribe", refused)
        client.set(RESULT_META_PREFIX + "q5", done("q5"), ex=60)
        async with waiter.watch("q5") as watch:
            meta = await watch.result(5)
        return meta, watch.subscribed

    meta, subscribed = run(url, body)
    assert not subscribed and isinstance(meta, dict) and meta["status"] == "SUCCESS"


def test_an_id_of_the_waiters_own_is_heard_through_its_pattern_without_a_subscription(url, monkeypatch):
    monkeypatch.setattr(results, "FALLBACK_POLL_S", 15.0)

    async def body(waiter: Counting, client: redis.Redis) -> tuple[object, ...]:
        for _ in range(500):  # the reader's PSUBSCRIBE, confirmed
            if waiter._pattern_live:
                break
            await asyncio.sleep(0.02)
        sent: list[str] = []
        subscribe = waiter._pubsub.subscribe

        async def counted(*channels: str) -> None:
            sent.extend(channels)
            await subscribe(*channels)

        waiter._pubsub.subscribe = counted  # type: ignore[method-assign]
        own, other = waiter.new_id(), "0" * 8 + waiter.new_id()[8:]
        answers = []
        for task_id in (own, other):
            async with waiter.watch(task_id) as watch:
                raw = done(task_id)
                client.set(RESULT_META_PREFIX + task_id, raw, ex=60)
                client.publish(RESULT_META_PREFIX + task_id, raw)
                answers.append(((await watch.result(5)) or {}).get("status"))
        return own, other, sent, answers, waiter.reads

    own, other, sent, answers, reads = run(url, body)
    assert len(own) == 36 and own[8] == "-" and all(c in "0123456789abcdef-" for c in own)
    assert answers == ["SUCCESS", "SUCCESS"] and reads == 0
    assert sent == [RESULT_META_PREFIX + other]  # only the other's id was subscribed to


def test_own_ids_differ_and_two_waiters_prefixes_differ(url):
    one, two = ResultWaiter(url), ResultWaiter(url)
    ids = {one.new_id() for _ in range(1000)}
    assert len(ids) == 1000 and len({i[:8] for i in ids}) == 1
    assert one.new_id()[:8] != two.new_id()[:8]


class LosingReader:
    """The reader's message wait made to lose the cancels of its first ``lost`` waits and answer
    None, as the real reader did when redis-py's ``wait_for`` dropped a cancel (Python 3.11)
    and its read's timeout then answered None; ``stubborn``: not before that timeout is over.
    Once ``over``, a wait is cancelled at once (so that a waiter without the fix still ends)."""

    def __init__(self, waiter: ResultWaiter, lost: int, stubborn: bool = False):
        self.lost, self.stubborn, self.waits, self.over = lost, stubborn, 0, False
        waiter._pubsub.get_message = self.get_message  # type: ignore[method-assign]

    async def get_message(self, timeout: float | None = 0.0, **_: object) -> None:
        self.waits += 1
        end = time.perf_counter() + (timeout or 0)
        while not self.over:
            try:
                await asyncio.sleep(max(0.0, end - time.perf_counter()))
                return None
            except asyncio.CancelledError:
                if self.waits > self.lost:
                    raise
                if not self.stubborn:
                    return None
        raise asyncio.CancelledError


@pytest.mark.timeout(60)
def test_close_ends_a_reader_whose_cancel_was_taken_for_its_read_timeout(url):
    """A gateway's close a few milliseconds after its start waited forever, now and then: the
    reader's read took the cancel for its own timeout and read on (gateway/results.py, _stop)."""

    async def main() -> tuple[float, bool]:
        waiter = ResultWaiter(url)
        reader = LosingReader(waiter, lost=3)
        await waiter.start()
        try:
            await asyncio.wait_for(_until(lambda: reader.waits > 0), 10)
            started = time.perf_counter()
            await asyncio.wait_for(waiter.close(), 5)  # one cancel, as before: 5 s and the reader on
            assert waiter._reader is not None
            return time.perf_counter() - started, waiter._reader.done()
        finally:
            reader.over = True

    took, ended = asyncio.run(main())
    assert ended and took < 4


@pytest.mark.timeout(60)
def test_a_close_that_is_cancelled_itself_is_not_held_by_a_stubborn_reader(url):
    """close awaited the cancelled reader inside ``suppress(CancelledError)``, which also
    swallowed a cancel of close itself: a shutdown bounded by ``wait_for`` ran past its bound."""

    async def main() -> None:
        waiter = ResultWaiter(url)
        reader = LosingReader(waiter, lost=3, stubborn=True)
        await waiter.start()
        # Without the fix the close below outlasts its bound: the reader is let go after 3 s,
        # so that the test fails then rather than hang.
        asyncio.get_running_loop().call_later(3, setattr, reader, "over", True)
        try:
            await asyncio.wait_for(_until(lambda: reader.waits > 0), 10)
            started = time.perf_counter()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(waiter.close(), 0.2)
            assert time.perf_counter() - started < 0.9  # the reader's wait is 1 s: not waited out
            await asyncio.wait_for(waiter.close(), 10)  # it ends as that wait does (closing)
            assert reader.waits == 1
        finally:
            reader.over = True

    asyncio.run(main())


def test_delivered_results_are_shortened_together_off_the_answers_path(url, monkeypatch):
    monkeypatch.setattr(results, "KEEP_BATCH_S", 0.05)

    async def body(waiter: Counting, client: redis.Redis) -> tuple[list[int], list[int], list[int]]:
        keys = [f"k{i}" for i in range(3)]
        for key in keys:
            client.set(RESULT_META_PREFIX + key, b"x", ex=3600)
        for key in keys[:2]:
            await waiter.keep_for(key, 60)  # returns at once
        at_once = [client.ttl(RESULT_META_PREFIX + k) for k in keys[:2]]
        for _ in range(100):  # shortened within KEEP_BATCH_S (a loaded machine: a while more)
            await asyncio.sleep(0.05)
            later = [client.ttl(RESULT_META_PREFIX + k) for k in keys[:2]]
            if all(t <= 60 for t in later):
                break
        await waiter.keep_for(keys[2], 60)
        await waiter.close()  # pending: shortened as the waiter closes
        return at_once, later, [client.ttl(RESULT_META_PREFIX + keys[2])]

    at_once, later, closing = run(url, body)
    assert all(t > 60 for t in at_once)
    assert all(0 < t <= 60 for t in later) and 0 < closing[0] <= 60


def test_route_dependencies_are_coroutines_so_no_request_pays_a_thread_hop_for_them():
    for dependency in (deps.gateway, deps.account, deps.grant):
        assert inspect.iscoroutinefunction(dependency), dependency.__name__


def test_the_query_routes_are_tried_first_and_resolve_no_dependencies(world):  # noqa: F811
    from fastapi.routing import APIRoute

    included = [r for r in world.app.router.routes if hasattr(r, "original_router")]
    first = [route for route in included[0].original_router.routes if isinstance(route, APIRoute)]
    assert {route.path for route in first} == {"/v1/queries", "/v1/queries/batch", "/v1/queries/{query_id}"}
    cheap = [r for r in first if r.name in ("submit", "result")]
    assert len(cheap) == 2 and all(r.dependant.dependencies == [] for r in cheap)
    key = world.a_key  # an account's key on an end user's route: the same typed refusal as before
    for method, path in [("POST", "/v1/queries"), ("GET", "/v1/queries/" + str(uuid.uuid4()))]:
        refused = world.call(key, method, path, content=b"x")
        assert refused.status_code == 403 and refused.json()["code"] == "wrong_credential", refused.text


@pytest.mark.parametrize("enabled", [False, True])
def test_fastapis_telemetry_follows_the_setting(enabled, tmp_path):
    from cipherpool.config.settings import Settings
    from cipherpool.gateway.app import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", gateway_telemetry=enabled))
    config = app._telemetry  # what FastAPI reads on every request
    assert [config[k] for k in ("tracing", "metrics", "logs", "operation_spans")] == [enabled] * 4


def test_the_quota_scripts_run_by_digest_and_are_sent_again_when_redis_forgot_them(url):
    client = redis.Redis.from_url(url)
    try:
        client.script_flush()
        assert usage.charge(client, "lean-t", 2) == 1  # unknown to Redis: sent whole (and cached)
        assert client.script_exists(*usage._SHA.values())[0]
        assert usage.charge(client, "lean-t", 2) == 2  # by digest
        with pytest.raises(errors.QuotaExceeded):
            usage.charge(client, "lean-t", 2)
        client.script_flush()
        assert usage.charge_runs(client, "lean-r", 5, 3) == 3
        assert usage.charge_runs(client, "lean-r", 5, 3) == 2  # as many as the quota has room for
        with pytest.raises(errors.QuotaExceeded):
            usage.charge_runs(client, "lean-r", 5, 1)
        assert usage.read(client, ["lean-t", "lean-r"]) == {
            "lean-t": usage.Usage(2, usage.read(client, ["lean-t"])["lean-t"].last_used_at),
            "lean-r": usage.Usage(5, usage.read(client, ["lean-r"])["lean-r"].last_used_at),
        }
    finally:
        client.close()


def test_the_guard_admits_a_cached_credential_without_a_thread_hop(world, monkeypatch):  # noqa: F811
    import cipherpool.gateway.guard as guard

    hops = thread_hops(guard, monkeypatch)
    token, key = world.tokens["two"][0], world.a_key
    world.app.state.gw.auth.forget()  # nothing cached: the first requests look their credential up
    for credential, path in [(token, "/v1/client/models"), (key, "/v1/models")]:
        assert world.call(credential, "GET", path).status_code == 200
    assert hops == ["_admit", "_admit"]
    hops.clear()
    for credential, path in [(token, "/v1/client/models"), (key, "/v1/models")]:
        assert world.call(credential, "GET", path).status_code == 200
    assert hops == []
    bad = world.call("cpt_" + "x" * 40, "GET", "/v1/client/models")
    assert bad.status_code == 401 and hops == ["_admit"]  # never cached: looked up, and counted as a failure


def test_the_rate_limiter_on_the_event_loop_counts_as_on_a_thread(url, monkeypatch):
    """hit_async: the same windows, limits, refusals and change counters as hit."""
    import redis.asyncio as aioredis

    from cipherpool.gateway.ratelimit import RateLimiter

    frozen = 1_000_000.5
    monkeypatch.setattr("cipherpool.gateway.ratelimit.time.time", lambda: frozen)
    sync = redis.Redis.from_url(url)
    sync.set("lean:generation", b"3")

    async def body() -> tuple[list[object], list[list[object]], int]:
        client = aioredis.Redis.from_url(url)
        try:
            limiter = RateLimiter(sync, token_rate_per_s=3, account_rate_per_s=100)
            answers = [await limiter.hit_async(client, "lean-a", "lean-t", also_get=["lean:generation"]) for _ in range(2)]
            answers.append(limiter.hit("lean-a", "lean-t", also_get=["lean:generation"]))  # the same window, shared
            refused = 0
            try:
                await limiter.hit_async(client, "lean-a", "lean-t")
            except errors.RateLimited as exc:
                refused = int(exc.retry_after_s or 0)
            unlimited = RateLimiter(sync, token_rate_per_s=0, account_rate_per_s=0)
            return await unlimited.hit_async(client, "lean-a", "lean-t", also_get=["lean:generation"]), answers, refused
        finally:
            await client.aclose()

    try:
        unlimited, answers, refused = asyncio.run(body())
    finally:
        sync.close()
    assert answers == [[b"3"]] * 3 and unlimited == [b"3"]
    assert refused == 1  # the 4th request in a window of a 3/s token, told to retry in a second


def test_the_rate_count_is_one_script_by_digest_sent_again_when_redis_forgot_it(url, monkeypatch):
    """Counts and change counters in one round trip, one reply: the script by its digest, and
    whole once more after a SCRIPT FLUSH (a restarted Redis), on either client; the windows
    get their expiry."""
    import redis.asyncio as aioredis

    from cipherpool.gateway.ratelimit import COUNT_AND_READ_SHA, WINDOW_S, RateLimiter

    frozen = 2_000_000.5
    monkeypatch.setattr("cipherpool.gateway.ratelimit.time.time", lambda: frozen)
    sync = redis.Redis.from_url(url)
    sync.set("lean:gen2", b"5")
    limiter = RateLimiter(sync, token_rate_per_s=10, account_rate_per_s=100)
    sent: list[str] = []
    real = sync.execute_command

    def recording(*args, **kwargs):
        sent.append(str(args[0]).upper())
        return real(*args, **kwargs)

    monkeypatch.setattr(sync, "execute_command", recording)
    sync.script_flush()
    assert limiter.hit("lean-a2", "lean-t2", also_get=["lean:gen2", "lean:none"]) == [b"5", None]
    assert limiter.hit("lean-a2", "lean-t2", also_get=["lean:gen2"]) == [b"5"]
    assert sent == ["SCRIPT FLUSH", "EVALSHA", "EVAL", "EVALSHA"]  # one command a request
    window = int(frozen // WINDOW_S)
    assert int(sync.get(f"cipherpool:rate:t:lean-t2:{window}")) == 2
    assert 0 < sync.ttl(f"cipherpool:rate:a:lean-a2:{window}") <= 2 * WINDOW_S

    async def body() -> list[object]:
        client = aioredis.Redis.from_url(url)
        try:
            await client.script_flush()
            return await limiter.hit_async(client, "lean-a2", "lean-t2", also_get=["lean:gen2"])
        finally:
            await client.aclose()

    assert asyncio.run(body()) == [b"5"]
    assert sync.script_exists(COUNT_AND_READ_SHA) == [True]
    assert int(sync.get(f"cipherpool:rate:t:lean-t2:{window}")) == 3


def test_a_query_is_published_on_the_event_loop_once_all_it_needs_is_at_hand(world, monkeypatch):  # noqa: F811
    """Its key reference cached and its message's shape proved (the process's first query
    builds it with Celery too, in the thread pool): counted, recorded and queued by one script
    through the waiter's asyncio client, with no thread-pool hop; over its quota, refused the
    same way, nothing queued."""
    import cipherpool.gateway.queries as queries
    from cipherpool.names import affinity_queue, model_queue
    from cipherpool.publishwrites import query_publish

    hops = thread_hops(queries, monkeypatch)
    model_id = world.models["digits"]
    queued = [model_queue("cpu", model_id), affinity_queue("cpu", model_id, "node-0@test")]
    usage_key = USAGE_PREFIX + world.tokens["one"][1]
    first = world.query("one", "digits")  # the process's first: the thread pool (a load, Celery's build)
    assert first.status_code == 202, first.text
    used = int(world.redis.hget(usage_key, "n"))
    ids, per_query = [], []
    while used < QUOTA:
        hops.clear()
        answer = world.query("one", "digits")
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
        per_query.append(list(hops))
        used += 1
    hops.clear()
    refused = world.query("one", "digits")
    assert (refused.status_code, refused.json()["code"]) == (429, "token_quota_exceeded")
    assert hops == []  # the refusal on the event loop too
    # The key reference was cached by the first; a message's shape (with a node's placement or
    # without) is built by Celery, in the thread pool, for its first query in the process only.
    assert sum(per_query, []) in ([], ["_submit"]) and per_query[-1] == [], per_query
    assert all(query_publish(world.app.state.gw.celery).proved().values())
    assert int(world.redis.hget(usage_key, "n")) == QUOTA
    messages = [m for q in queued for m in world.redis.lrange(q, 0, -1)]
    for query_id in ids:  # queued, its owner recorded and its in-flight copy kept, by the one script
        assert world.redis.get(QUERY_OWNER_PREFIX + query_id) == world.tokens["one"][1].encode()
        assert sum(query_id.encode() in m for m in messages) == 1
        assert world.redis.hget(INFLIGHT_PREFIX + query_id, "message") and world.redis.zscore(INFLIGHT_INDEX_KEY, query_id)
    assert world.redis.hget(usage_key, "last")


def test_a_large_body_or_a_crowd_is_published_from_the_thread_pool(world, monkeypatch):  # noqa: F811
    """Building a large body's message would hold the event loop; and each query published
    from it holds one of the waiter's connections: past either bound, the thread pool."""
    import cipherpool.gateway.queries as queries

    hops = thread_hops(queries, monkeypatch)
    gw, token = world.app.state.gw, world.tokens["two"][0]  # no quota
    put = world.call(token, "PUT", f"/v1/client/keys/{KEY_ID}?model=digits", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
    assert put.status_code == 201, put.text

    def published_with() -> list[str]:
        hops.clear()
        answer = world.query("two", "digits")
        assert answer.status_code == 202, answer.text
        return [hop for hop in hops if hop != "record"]  # (the key set's use, once a minute)

    for _ in range(3):
        published_with()  # its key reference cached, both shapes proved
    assert published_with() == []  # the event loop
    monkeypatch.setattr(queries, "LOOP_MAX_BYTES", 10)
    assert published_with() == ["_publish"]
    monkeypatch.setattr(queries, "LOOP_MAX_BYTES", 64 * 1024)
    gw.publishing_on_loop += queries.LOOP_MAX_AT_ONCE
    try:
        assert published_with() == ["_publish"]
    finally:
        gw.publishing_on_loop -= queries.LOOP_MAX_AT_ONCE
    assert published_with() == [] and gw.publishing_on_loop == 0


@pytest.mark.parametrize("warm_s", [30.0, 0.0])
def test_a_client_slower_than_the_cache_ttl_still_finds_its_lookups_cached(world, monkeypatch, warm_s):  # noqa: F811
    """A query each 1.5 s against a 1 s TTL (a model that computes for longer than the TTL):
    within ``auth_cache_warm_s`` of their last use a credential's lookups are loaded again in
    the background, so its requests are admitted and published on the event loop. Without the
    window (0) each met its entries expired and looked them up again in the thread pool: the
    database reads on its path (digits on a slow spell: 7.5 ms of its 15 ms)."""
    import time

    import cipherpool.gateway.guard as guard
    import cipherpool.gateway.queries as queries
    from cipherpool.gateway import ttlcache

    auth, token = world.app.state.gw.auth, world.tokens["two"][0]  # no quota
    put = world.call(token, "PUT", f"/v1/client/keys/{KEY_ID}?model=digits", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
    assert put.status_code in (200, 201), put.text
    monkeypatch.setattr(ttlcache, "REFRESH_AT", 0.5)  # half a second of slack for a loaded machine's refresh
    for cache in (auth._principals, auth._keys, auth._serving):
        monkeypatch.setattr(cache, "ttl_s", 1.0)
        monkeypatch.setattr(cache, "warm_s", warm_s)
    auth.forget()
    guard_hops, query_hops = thread_hops(guard, monkeypatch), thread_hops(queries, monkeypatch)
    assert world.query("two", "digits").status_code == 202  # nothing cached: looked up on the path
    assert guard_hops == ["_admit"]
    for _ in range(2):
        time.sleep(1.5)
        guard_hops.clear()
        query_hops.clear()
        answer = world.query("two", "digits")
        assert answer.status_code == 202, answer.text
        # A lookup on the path: the guard's _admit, or the query's _publish (its key set's
        # reference). (A _submit is a message shape's first query, which Celery builds.)
        looked_up = [hop for hop in guard_hops + query_hops if hop in ("_admit", "_publish")]
        assert looked_up == ([] if warm_s else ["_admit", "_publish"]), (guard_hops, query_hops)


OCTET = {"Content-Type": "application/octet-stream"}


# ---- the guard's count and the query's admission as one script (cipherpool/gateway/admission.py) ----


def scripts_run(gw, monkeypatch) -> list[str]:
    """The digests of the scripts the gateway's asyncio client runs from now on, in order."""
    from cipherpool.gateway.admission import ADMIT, ADMIT_SHA
    from cipherpool.gateway.ratelimit import COUNT_AND_READ, COUNT_AND_READ_SHA

    names = {ADMIT_SHA: "admit", COUNT_AND_READ_SHA: "count", ADMIT: "admit", COUNT_AND_READ: "count"}
    client, run = gw.waiter._redis, []
    evalsha, eval_ = client.evalsha, client.eval

    async def counted_evalsha(sha, *args):
        run.append(names.get(sha, "other"))
        return await evalsha(sha, *args)

    async def counted_eval(script, *args):
        run.append(names.get(script, "other") + " (sent whole)")
        return await eval_(script, *args)

    monkeypatch.setattr(client, "evalsha", counted_evalsha)
    monkeypatch.setattr(client, "eval", counted_eval)
    return run


class FrozenClock:
    """The rate limiter's clock, held in one window of its own for a test (a 1 s window would
    otherwise turn under a loaded machine's test); ``turn()`` moves it to the next."""

    def __init__(self) -> None:
        import random

        self.now = float(4_000_000_000 + random.randrange(1_000_000)) + 0.5

    def time(self) -> float:
        return self.now

    def turn(self) -> None:
        self.now += 1.0


@pytest.fixture
def frozen(monkeypatch) -> FrozenClock:
    from cipherpool.gateway import ratelimit

    clock = FrozenClock()
    monkeypatch.setattr(ratelimit, "time", clock)
    return clock


def windows_counted(w, token: str, clock: FrozenClock) -> int:
    """The requests counted in the token's rate window now."""
    return int(w.redis.get(f"cipherpool:rate:t:{w.tokens[token][1]}:{int(clock.now)}") or 0)


@pytest.fixture
def warm_two(world):  # noqa: F811
    """Token "two" (no quota) with a key set, its lookups cached and its message shape proved."""
    w = world
    token = w.tokens["two"][0]
    put = w.call(token, "PUT", f"/v1/client/keys/{KEY_ID}?model=digits", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
    assert put.status_code in (200, 201), put.text
    for _ in range(3):
        assert w.query("two", "digits").status_code == 202
    return w


def test_a_small_query_is_counted_and_admitted_by_one_script(warm_two, monkeypatch, frozen):
    """The guard leaves a small query's count to its admission: one script, one round trip,
    and the request counted once in its windows, the query once in its quota and queue."""
    w = warm_two
    run = scripts_run(w.app.state.gw, monkeypatch)
    usage_key = USAGE_PREFIX + w.tokens["two"][1]
    used, counted = int(w.redis.hget(usage_key, "n")), windows_counted(w, "two", frozen)
    answer = w.query("two", "digits")
    assert answer.status_code == 202, answer.text
    assert run == ["admit"]
    assert int(w.redis.hget(usage_key, "n")) == used + 1
    assert windows_counted(w, "two", frozen) == counted + 1
    query_id = answer.json()["id"]
    assert w.redis.get(QUERY_OWNER_PREFIX + query_id) == w.tokens["two"][1].encode()
    assert w.redis.hget(INFLIGHT_PREFIX + query_id, "message")


def test_other_requests_are_counted_by_the_guard_as_before(warm_two, monkeypatch):
    """A poll, a batch, a management call: the guard's own script, before the route."""
    w = warm_two
    run = scripts_run(w.app.state.gw, monkeypatch)
    query_id = w.query("two", "digits").json()["id"]
    assert w.call(w.a_key, "GET", "/v1/models").status_code == 200  # (cached now)
    run.clear()
    assert w.call(w.tokens["two"][0], "GET", f"/v1/queries/{query_id}").status_code == 202
    assert w.call(w.a_key, "GET", "/v1/models").status_code == 200
    assert run == ["count", "count"]


def test_a_query_over_its_rate_is_refused_by_the_admission_and_admits_nothing(warm_two, monkeypatch, frozen):
    """Over the token's rate the admission answers the guard's 429 itself, counting nothing in
    the quota and queueing nothing; the next request in that window is then counted by the
    guard before its body is read (the gateway remembers the refusal), and a new window
    admits again."""
    w = warm_two
    gw = w.app.state.gw
    monkeypatch.setitem(gw.limiter._limits, "t", 2)
    run = scripts_run(gw, monkeypatch)
    usage_key = USAGE_PREFIX + w.tokens["two"][1]
    used = int(w.redis.hget(usage_key, "n"))
    answers = [w.query("two", "digits") for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 429, 429], [a.text for a in answers]
    assert run == ["admit", "admit", "admit", "count"]  # the third refused by the admission, the fourth by the guard
    assert all(a.json()["code"] == "rate_limited" and int(a.headers["retry-after"]) >= 1 for a in answers[2:])
    assert int(w.redis.hget(usage_key, "n")) == used + 2  # a refused one is neither counted nor queued
    for answer in answers[:2]:
        assert w.redis.hget(INFLIGHT_PREFIX + answer.json()["id"], "message")
    assert windows_counted(w, "two", frozen) == 4
    frozen.turn()
    run.clear()
    assert w.query("two", "digits").status_code == 202 and run == ["admit"]


def test_a_change_announced_meanwhile_admits_nothing_and_the_query_goes_the_ordinary_way(warm_two, monkeypatch, frozen):
    """Another gateway announced a change (its counter moved): the admission counts the rate,
    admits nothing, and the gateway authenticates again; an unchanged token's query is then
    queued once, and counted once in its windows."""
    from cipherpool.names import AUTH_GENERATION_KEY

    w = warm_two
    run = scripts_run(w.app.state.gw, monkeypatch)
    usage_key = USAGE_PREFIX + w.tokens["two"][1]
    used, counted = int(w.redis.hget(usage_key, "n")), windows_counted(w, "two", frozen)
    w.redis.incr(AUTH_GENERATION_KEY)
    answer = w.query("two", "digits")
    assert answer.status_code == 202, answer.text
    assert run[0] == "admit" and "count" not in run, run  # counted by the admission, not again
    assert int(w.redis.hget(usage_key, "n")) == used + 1
    assert windows_counted(w, "two", frozen) == counted + 1
    assert w.redis.hget(INFLIGHT_PREFIX + answer.json()["id"], "message")


def test_a_token_revoked_through_another_gateway_is_refused_by_the_admission(world, monkeypatch):  # noqa: F811
    """Revoked in the database and announced (as another gateway does): this gateway's cached
    grant is not admitted; it authenticates again and answers 401, nothing queued."""
    w = world
    from cipherpool.db import session_scope
    from cipherpool.db.tables import Account
    from cipherpool.names import AUTH_GENERATION_KEY
    from cipherpool.services import tokens

    with session_scope(w.db) as session:
        alice = session.get(Account, w.alice)
        made, value = tokens.create_token(session, alice, "revoked-elsewhere", "digits")
        token_id = made.id
    w.tokens["revoked-elsewhere"] = (value, token_id)
    put = w.call(value, "PUT", f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
    assert put.status_code == 201, put.text
    for _ in range(2):
        assert w.query("revoked-elsewhere", "digits").status_code == 202
    run = scripts_run(w.app.state.gw, monkeypatch)
    usage_key = USAGE_PREFIX + token_id
    used = int(w.redis.hget(usage_key, "n"))
    with session_scope(w.db) as session:
        tokens.revoke_token(session, session.get(Account, w.alice), token_id)
    w.redis.incr(AUTH_GENERATION_KEY)
    answer = w.query("revoked-elsewhere", "digits")
    assert answer.status_code == 401 and answer.json()["code"] == "token_revoked", answer.text
    assert run == ["admit"]
    assert int(w.redis.hget(usage_key, "n")) == used


def test_a_refused_body_or_refused_parameters_still_count_the_rate(warm_two, monkeypatch, frozen):
    """What the route refuses before any admission (a body no model could take, a parameter
    out of range) is counted in the windows all the same, by the guard's own script."""
    w = warm_two
    run = scripts_run(w.app.state.gw, monkeypatch)
    counted = windows_counted(w, "two", frozen)
    token = w.tokens["two"][0]
    garbage = w.call(token, "POST", "/v1/queries", content=b"not an envelope", headers=OCTET)
    assert (garbage.status_code, garbage.json()["code"]) == (422, "malformed_ciphertext"), garbage.text
    out_of_range = w.query("two", "digits", wait=-1)
    assert out_of_range.status_code == 422, out_of_range.text
    assert run == ["count", "count"]
    assert windows_counted(w, "two", frozen) == counted + 2


def test_over_its_rate_a_client_is_refused_for_its_rate_before_its_body(warm_two, monkeypatch, frozen):
    """As when the guard counted first: a client over its rate gets 429, whatever its body
    would have earned."""
    w = warm_two
    monkeypatch.setitem(w.app.state.gw.limiter._limits, "t", 1)
    token = w.tokens["two"][0]
    codes = [w.call(token, "POST", "/v1/queries", content=b"garbage", headers=OCTET).json()["code"] for _ in range(3)]
    assert codes == ["malformed_ciphertext", "rate_limited", "rate_limited"], codes


def test_a_change_observed_by_another_request_meanwhile_still_admits_nothing(world, monkeypatch):  # noqa: F811
    """The guard read the cache, then another request observed a change (a revocation
    announced) before this query's admission: the admission compares the counters with those
    the guard had before it read the cache, not with the gateway's latest, so it admits
    nothing; authenticated again, the token is refused."""
    from cipherpool.db import session_scope
    from cipherpool.db.tables import Account
    from cipherpool.gateway import admission
    from cipherpool.names import AUTH_GENERATION_KEY
    from cipherpool.services import tokens

    w = world
    with session_scope(w.db) as session:
        made, value = tokens.create_token(session, session.get(Account, w.alice), "revoked-meanwhile", "digits")
        token_id = made.id
    w.tokens["revoked-meanwhile"] = (value, token_id)
    put = w.call(value, "PUT", f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
    assert put.status_code == 201, put.text
    for _ in range(2):
        assert w.query("revoked-meanwhile", "digits").status_code == 202
    gw, real = w.app.state.gw, admission.admit

    async def meanwhile(*args, **kwargs):
        with session_scope(w.db) as session:
            tokens.revoke_token(session, session.get(Account, w.alice), token_id)
        w.redis.incr(AUTH_GENERATION_KEY)
        gw.auth.sync()  # another request observed it first: the caches are dropped, the counter taken
        return await real(*args, **kwargs)

    monkeypatch.setattr(admission, "admit", meanwhile)
    used = int(w.redis.hget(USAGE_PREFIX + token_id, "n"))
    answer = w.query("revoked-meanwhile", "digits")
    assert answer.status_code == 401 and answer.json()["code"] == "token_revoked", answer.text
    assert int(w.redis.hget(USAGE_PREFIX + token_id, "n")) == used


def test_a_body_over_the_cap_is_refused_and_counted_by_the_guard(warm_two, monkeypatch, frozen):
    """A declared body over the route's cap (a cap below the event loop's bound) is the
    guard's 413, counted by the guard: nothing is left to an admission that never comes."""
    w = warm_two
    gw = w.app.state.gw
    monkeypatch.setattr(gw, "body_cap", lambda method, path: 16)
    run = scripts_run(gw, monkeypatch)
    answer = w.query("two", "digits")
    assert answer.status_code == 413, answer.text
    assert run == ["count"] and windows_counted(w, "two", frozen) == 1


def test_a_full_redis_refuses_the_admissions_count_and_the_guard_counts_in_process(warm_two, monkeypatch, frozen):
    """Redis refuses writes (full): the admission's count is refused, nothing admitted; the
    guard's count then counts in this process (as it does whenever Redis is full), and the
    query meets the full Redis as before (507 store_full), counted once."""
    w = warm_two
    gw = w.app.state.gw
    monkeypatch.setitem(gw.limiter._limits, "t", 1000)
    run = scripts_run(gw, monkeypatch)
    usage_key = USAGE_PREFIX + w.tokens["two"][1]
    used = int(w.redis.hget(usage_key, "n"))
    fillers = []
    try:
        # Until Redis refuses even a small write (tests/test_store_full.py), twice: Redis
        # shrinks the filling client's query buffer a moment after, and what that frees would
        # admit the query.
        for attempt in range(2):
            time.sleep(0.3 * attempt)
            for i in range(10_000):
                try:
                    w.redis.set(f"filler:{attempt}:{i}", b"x" * 64 * 1024)
                    fillers.append(f"filler:{attempt}:{i}")
                except redis.exceptions.OutOfMemoryError:
                    try:
                        w.redis.set(f"filler:small:{attempt}:{i}", b"x")
                        fillers.append(f"filler:small:{attempt}:{i}")
                    except redis.exceptions.OutOfMemoryError:
                        break
        answer = w.query("two", "digits")
    finally:
        for chunk in range(0, len(fillers), 500):
            w.redis.delete(*fillers[chunk : chunk + 500])
    assert (answer.status_code, answer.json()["code"]) == (507, "store_full"), answer.text
    assert run[:2] == ["admit", "count"], run
    window = int(frozen.now)
    assert gw.limiter._local.incr("t", w.tokens["two"][1], window, 0) == 1  # counted once, in this process
    assert int(w.redis.hget(usage_key, "n")) == used and windows_counted(w, "two", frozen) == 0


def test_plain_query_requests_skip_fastapis_work_and_the_rest_get_its_answers(warm_two, monkeypatch):  # noqa: F811
    """cipherpool/gateway/querylane.py: a query's submit and poll with the parameters a client
    sends are answered without FastAPI resolving them; any other form goes to FastAPI's route,
    which answers it as before (a 422 where it refuses)."""
    import fastapi.routing

    import cipherpool.gateway.queries as queries

    w = warm_two
    resolved: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        resolved.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    for params in ({}, {"wait": 0}, {"wait": "0.05", "wait_for_worker": "true", "mode": "auto"}, {"wait_for_worker": 0}):
        answer = w.query("two", "digits", **params)
        assert answer.status_code == 202, (params, answer.text)
    assert resolved == []
    query_id = answer.json()["id"]
    hops = thread_hops(queries, monkeypatch)
    for path in (f"/v1/queries/{query_id}", f"/v1/queries/{query_id}?wait=0.02"):
        assert w.call(w.tokens["two"][0], "GET", path).status_code == 202
    assert resolved == [] and hops == []  # the owner read on the waiter's client too
    assert w.call(w.tokens["one"][0], "GET", f"/v1/queries/{query_id}").status_code == 404  # another token's

    for params, status in [
        ({"wait_for_worker": "yes"}, 202),  # pydantic's other spellings: FastAPI's to read
        ({"wait": "1e-2"}, 202),
        ({"wait": "601"}, 422),
        ({"wait": "-1"}, 422),
        ({"mode": "nowhere"}, 422),
        ({"wait": ["0", "1"]}, 202),  # repeated
        ({"other": "1"}, 202),  # unknown: FastAPI ignores it
    ]:
        resolved.clear()
        answer = w.query("two", "digits", **params)
        assert answer.status_code == status, (params, answer.text)
        assert resolved == ["/v1/queries"], params
        if status == 422:
            assert answer.json()["code"] == "invalid_input"
    for path, status in [(f"/v1/queries/{query_id}?wait=x", 422), ("/v1/queries/" + "g" * 36, 422)]:
        resolved.clear()
        assert w.call(w.tokens["two"][0], "GET", path).status_code == status, path
        assert resolved == [path.split("?")[0]]
    resolved.clear()
    assert w.call(w.tokens["two"][0], "HEAD", f"/v1/queries/{query_id}").status_code == 405  # as before
    assert w.call(w.tokens["two"][0], "PUT", "/v1/queries").status_code == 405


def test_the_lane_answers_as_fastapis_route_does(warm_two, monkeypatch):  # noqa: F811
    """The same requests, each answered by the lane and then by FastAPI's route (the lane told
    to take nothing): the same status and the same typed code or answer's shape; the
    parameters the lane reads change the answer where they should (``wait_for_worker`` on a
    model with no worker up, a wait that finds the result)."""
    from cipherpool.gateway import querylane

    w = warm_two
    token = w.tokens["two"][0]
    query_id = w.query("two", "digits").json()["id"]

    def sent() -> list[tuple[int, object]]:
        answers = [
            w.query("two", "idle"),
            w.query("two", "idle", wait_for_worker="true"),
            w.query("two", "idle", wait_for_worker="1", mode="shared"),
            w.query("two", "digits", mode="dedicated", wait="0.01"),
            w.query("two", "digits", data=b"\x00" * 7),
            w.query("one", "idle"),  # a token without the model
            w.call(token, "GET", f"/v1/queries/{query_id}?wait=0.01"),
            w.call(w.tokens["one"][0], "GET", f"/v1/queries/{query_id}"),  # another token's query
            w.call(token, "GET", f"/v1/queries/{uuid.uuid4()}"),
        ]
        return [(a.status_code, a.json().get("code") or sorted(a.json())) for a in answers]

    lane = sent()
    monkeypatch.setattr(querylane, "submit_params", lambda _query_string: None)
    monkeypatch.setattr(querylane, "result_params", lambda _query_string: None)
    assert lane == sent()
    assert [status for status, _ in lane] == [503, 404, 503, 202, 422, 403, 202, 404, 404], lane  # 404: past the worker check


def test_the_lanes_pass_what_the_endpoints_take_and_stand_aside_for_app_dependencies(tmp_path, monkeypatch):
    from fastapi import Depends, FastAPI

    from cipherpool.config.settings import Settings
    from cipherpool.gateway import app as gateway_app
    from cipherpool.gateway import queries, querylane

    taken = {"wait": 0.0, "wait_for_worker": False, "mode": queries.Route.AUTO}
    assert querylane.submit_params(b"") == taken
    assert set(inspect.signature(queries.submit).parameters) == {"request", *taken}
    assert set(inspect.signature(queries.result).parameters) == {"request", "query_id", *querylane.result_params(b"")}
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    assert isinstance(gateway_app.create_app(settings).router.middleware_stack, querylane.QueryLanes)

    async def extra() -> None:
        return None

    def with_dependency(**kwargs):
        made = FastAPI(**kwargs)
        made.router.dependencies.append(Depends(extra))
        return made

    monkeypatch.setattr(gateway_app, "FastAPI", with_dependency)
    assert not isinstance(gateway_app.create_app(settings).router.middleware_stack, querylane.QueryLanes)


LANE_TAKES = {
    *("", "wait=0", "wait=30.0", "wait=600", "wait=600.0", "wait=007", "wait=1.25", "mode=auto", "mode=shared"),
    *("wait_for_worker=true", "wait_for_worker=false", "wait_for_worker=1", "wait_for_worker=0", "mode=dedicated"),
    "wait=1&mode=shared&wait_for_worker=true",
}


@pytest.mark.parametrize(
    "raw",
    ["", "wait=0", "wait=30.0", "wait=600", "wait=600.0", "wait=600.000001", "wait=601", "wait=007", "wait=1.25",
     "wait=0.1234567890123456789", "wait=", "wait=1e3", "wait=inf", "wait=nan", "wait=%31", "wait= 1", "wait=-0",
     "wait_for_worker=true", "wait_for_worker=false", "wait_for_worker=1", "wait_for_worker=0", "wait_for_worker=True",
     "wait_for_worker=yes", "mode=auto", "mode=shared", "mode=dedicated", "mode=AUTO", "mode=", "wait=1&wait=2",
     "wait=1&mode=shared&wait_for_worker=true", "wait=1&", "x=1", "wait=1+"],
)  # fmt: skip
def test_the_lane_reads_a_query_string_as_fastapi_does_or_not_at_all(raw):
    """Whatever the lane takes, FastAPI's reading (pydantic's, of the same declared types)
    gives the same values."""
    from urllib.parse import parse_qsl

    from pydantic import TypeAdapter

    from cipherpool.gateway import queries, querylane

    adapters = {"wait": TypeAdapter(queries.Wait), "wait_for_worker": TypeAdapter(bool), "mode": TypeAdapter(queries.Mode)}
    defaults = {"wait": 0.0, "wait_for_worker": False, "mode": queries.Route.AUTO}
    taken = querylane.submit_params(raw.encode())
    assert (taken is not None) == (raw in LANE_TAKES), raw
    if taken is None:
        return
    pairs = dict(parse_qsl(raw, keep_blank_values=True))
    read = {name: adapters[name].validate_python(pairs[name]) if name in pairs else default for name, default in defaults.items()}
    assert taken == read
    polled = querylane.result_params(raw.encode())
    assert polled == {"wait": taken["wait"]} if set(pairs) <= {"wait"} else polled is None


def test_a_burst_past_the_waiters_connections_waits_for_one_rather_than_failing(url, monkeypatch):
    """More requests at once than the result waiter's client has connections (each poll reads
    its owner and its result on it): they wait for a free one, none is refused with redis-py's
    "Too many connections" (a 503 to the client)."""
    monkeypatch.setattr(results, "WAITER_CONNECTIONS", 3)

    async def body(waiter: Counting, client: redis.Redis) -> list[object]:
        client.set(RESULT_META_PREFIX + "burst", done("burst"), ex=60)
        return await asyncio.gather(*(waiter.meta("burst") for _ in range(40)), return_exceptions=True)

    found = run(url, body)
    assert [type(meta).__name__ for meta in found if not isinstance(meta, dict)] == []
