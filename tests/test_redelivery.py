"""Queries a Redis broker lost on the way to a node are sent again (cipherpool.inflight,
cipherpool.scheduler.redeliver), against a real redis-server and real kombu messages.

The loss is made as it happens in a partition: the message is popped from its queue (Redis
counts it delivered) and never reaches a consumer, so it is in no queue and in no node's
unacknowledged hash. A message a real kombu consumer holds unacknowledged, one still queued
and one that started are never sent again."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from kombu import Connection, Consumer

from cipherpool import inflight
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.dispatch import keeper, publish_query, query_queue
from cipherpool.errors import BrokerUnavailable
from cipherpool.messages import QueryRequest
from cipherpool.names import INFLIGHT_INDEX_KEY, INFLIGHT_PREFIX, RESULT_META_PREFIX
from cipherpool.scheduler import redeliver
from cipherpool.workers.afteranswer import AfterAnswer
from cipherpool.workers.node import NodeRuntime
from cipherpool.workers.query import Delivery, handle
from tests.helpers import own_redis, redis_broker_platform

GRACE = 10.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with own_redis(tmp_path_factory, "redelivery") as url:
        yield url


@pytest.fixture
def platform(redis_url, tmp_path):
    with redis_broker_platform(redis_url, tmp_path, redelivery_grace_s=GRACE) as made:
        yield made


@pytest.fixture
def ctx(platform):
    return platform[0]


@pytest.fixture
def app(platform):
    return platform[1]


def request_for(model_id: str = "m1") -> QueryRequest:
    return QueryRequest(token_id="t1", model_id=model_id, key_id="k1", blob_id="b1", input=b"\x01" * 64, submitted_at=time.time())


def publish(app, ctx, model_id: str = "m1", expires_s: float = 300.0) -> str:
    query_id = str(uuid.uuid4())
    publish_query(app, request_for(model_id), "cpu", expires_s, task_id=query_id, model_name="digits", keep=ctx.store.redis)
    return query_id


def queue_name(model_id: str = "m1") -> str:
    return query_queue("cpu", model_id).name


def lose(ctx, model_id: str = "m1") -> bytes:
    """What a partition does: the message leaves its queue and reaches nobody."""
    popped = ctx.broker_redis.rpop(queue_name(model_id))
    assert popped is not None
    return popped


def queued_ids(ctx, model_id: str = "m1") -> list[str]:
    import json

    return [json.loads(m)["headers"]["id"] for m in ctx.broker_redis.lrange(queue_name(model_id), 0, -1)]


def test_a_published_query_is_recorded_until_it_is_forgotten(app, ctx):
    query_id = publish(app, ctx)
    assert ctx.store.redis.zscore(INFLIGHT_INDEX_KEY, query_id) is not None
    record = inflight.load(ctx.store.redis, [query_id])[query_id]
    assert record is not None and record.message.queue == queue_name() and record.sent == 0
    assert 0 < ctx.store.redis.ttl(INFLIGHT_PREFIX + query_id) <= 300 + inflight.SLACK_S
    inflight.forget(ctx.store.redis, query_id)
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None
    assert ctx.store.redis.zscore(INFLIGHT_INDEX_KEY, query_id) is None


def test_a_lost_query_is_sent_again_under_its_id_after_two_looks(app, ctx):
    query_id = publish(app, ctx)
    original = lose(ctx)
    assert queued_ids(ctx) == []
    now = time.time()

    first = redeliver.redeliver(ctx, app, now=now + GRACE + 1)  # found nowhere: marked only
    assert first.missing == 1 and first.sent == []
    early = redeliver.redeliver(ctx, app, now=now + GRACE + 5)  # missing, but not for a grace yet
    assert early.sent == [] and queued_ids(ctx) == []
    second = redeliver.redeliver(ctx, app, now=now + 2 * GRACE + 2)
    assert second.sent == [query_id]
    assert queued_ids(ctx) == [query_id]

    import json

    again, before = json.loads(ctx.broker_redis.lindex(queue_name(), 0)), json.loads(original)
    assert again["body"] == before["body"]  # the same request, byte for byte
    assert again["headers"]["expires"] == before["headers"]["expires"]  # its first deadline
    assert again["headers"]["shadow"] == before["headers"]["shadow"]
    record = inflight.load(ctx.store.redis, [query_id])[query_id]
    assert record is not None and record.sent == 1 and record.missing_since is None


def test_a_queued_query_is_never_sent_again(app, ctx):
    publish(app, ctx)
    publish(app, ctx)
    now = time.time()
    for step in range(4):
        report = redeliver.redeliver(ctx, app, now=now + GRACE + 1 + step * GRACE)
        assert report.sent == [] and report.missing == 0
    assert len(queued_ids(ctx)) == 2


def test_a_query_a_node_holds_unacknowledged_is_never_sent_again(app, ctx):
    """A real kombu consumer takes the message and does not acknowledge it (a node computing
    it): kombu has it in its unacked hash, and redelivery leaves it to kombu."""
    query_id = publish(app, ctx)
    held = []
    with Connection(ctx.settings.effective_broker_url()) as conn:
        consumer = Consumer(
            conn, queues=[query_queue("cpu", "m1")], callbacks=[lambda _body, message: held.append(message)], accept=["msgpack"]
        )
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=5)
            assert held and held[0].headers["id"] == query_id
            now = time.time()
            for step in range(3):
                report = redeliver.redeliver(ctx, app, now=now + GRACE + 1 + step * GRACE)
                assert report.sent == [] and report.missing == 0
            held[0].ack()


def test_a_started_query_is_forgotten_not_sent(app, ctx):
    query_id = publish(app, ctx)
    lose(ctx)
    ctx.result_redis.set(RESULT_META_PREFIX + query_id, b"started")  # what task_track_started writes
    report = redeliver.redeliver(ctx, app, now=time.time() + GRACE + 1)
    assert report.started == 1
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None
    assert redeliver.redeliver(ctx, app, now=time.time() + 3 * GRACE).sent == []


def test_a_query_past_its_deadline_is_forgotten_not_sent(app, ctx):
    query_id = publish(app, ctx, expires_s=15)
    lose(ctx)
    now = time.time()
    assert redeliver.redeliver(ctx, app, now=now + GRACE + 1).missing == 1
    report = redeliver.redeliver(ctx, app, now=now + 16)
    assert report.expired == 1 and report.sent == []
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None


def test_a_query_lost_again_and_again_is_given_up_after_the_most_redeliveries(app, ctx):
    ctx.settings.redelivery_max = 2
    query_id = publish(app, ctx)
    now, sent = time.time(), 0
    for round_ in range(3):
        lose(ctx)
        t = now + GRACE + 1 + round_ * 3 * GRACE
        redeliver.redeliver(ctx, app, now=t)
        report = redeliver.redeliver(ctx, app, now=t + GRACE + 1)
        sent += len(report.sent)
        if round_ == 2:
            assert report.given_up == 1
    assert sent == 2
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None


def test_only_ids_asked_about_are_found_and_priority_lists_are_read(app, ctx):
    a, b = publish(app, ctx), publish(app, ctx)
    moved = lose(ctx)  # a's message, into the list kombu uses for priority 9
    ctx.broker_redis.lpush(queue_name() + redeliver.PRIORITY_SEPARATOR + "9", moved)
    assert redeliver.find(ctx.broker_redis, [a, b, "nope"], {queue_name()}) == {a, b}


def test_a_message_that_could_not_be_sent_is_not_kept(app, ctx, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise BrokerUnavailable("down")

    monkeypatch.setattr("cipherpool.dispatch._send", refuse)
    with pytest.raises(BrokerUnavailable):
        publish(app, ctx)
    assert ctx.store.redis.zcard(INFLIGHT_INDEX_KEY) == 0


def test_nothing_is_kept_or_looked_at_on_rabbitmq(tmp_path, redis_url):
    settings = Settings(data_dir=tmp_path, broker_url="amqp://guest:guest@127.0.0.1:5672//", store_url=redis_url)
    assert not settings.broker_is_redis()
    assert Settings(data_dir=tmp_path, broker_url="rediss://h:6379/0").broker_is_redis()
    assert Settings(data_dir=tmp_path, broker_url="redis+socket:///run/redis.sock").broker_is_redis()
    report = redeliver.redeliver(PlatformContext(settings), app=None, now=time.time() + 100)  # type: ignore[arg-type]
    assert report == redeliver.RedeliveryReport()


def test_a_node_forgets_quietly_when_redis_is_gone():
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(redis.ConnectionError):
        inflight.forget(gone, "q")
    inflight.forget_quietly(gone, "q")  # the same failure, swallowed: the record is left to beat


def test_queries_are_kept_on_a_redis_broker_only_and_only_with_redelivery_on(tmp_path, ctx):
    assert keeper(ctx.settings, ctx.store) is ctx.store.redis
    off = ctx.settings.model_copy(update={"redelivery_grace_s": 0})
    rabbit = ctx.settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:5672//"})
    assert keeper(off, ctx.store) is None and keeper(rabbit, ctx.store) is None


def node_runtime() -> NodeRuntime:
    return NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: None,
    )


def test_a_node_forgets_the_record_as_it_starts_the_query(app, ctx):
    query_id = publish(app, ctx)
    handle(ctx, node_runtime(), b"not a request", Delivery(task_id=query_id))  # refused, but started
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None
    assert ctx.store.redis.zscore(INFLIGHT_INDEX_KEY, query_id) is None


def test_a_pool_node_forgets_the_record_once_the_answer_is_stored(app, ctx):
    """Not on the answer's path: queued while the task runs, sent at its task_postrun."""
    query_id = publish(app, ctx)
    runtime = node_runtime()
    runtime.after_answer = AfterAnswer(lambda: ctx.store.redis)
    handle(ctx, runtime, b"not a request", Delivery(task_id=query_id))
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is not None
    assert runtime.after_answer.send() == 2  # DEL and ZREM, one round trip
    assert inflight.load(ctx.store.redis, [query_id])[query_id] is None
    assert ctx.store.redis.zscore(INFLIGHT_INDEX_KEY, query_id) is None
    assert runtime.after_answer.send() == 0


def test_two_runs_at_once_never_both_send(app, ctx):
    publish(app, ctx)
    lose(ctx)
    now = time.time()
    redeliver.redeliver(ctx, app, now=now + GRACE + 1)
    ctx.store.redis.set(redeliver.LOCK_KEY, "another run")
    assert redeliver.redeliver(ctx, app, now=now + 3 * GRACE).sent == []  # stands down
    assert queued_ids(ctx) == []
    ctx.store.redis.delete(redeliver.LOCK_KEY)
    assert len(redeliver.redeliver(ctx, app, now=now + 3 * GRACE).sent) == 1
    assert ctx.store.redis.get(redeliver.LOCK_KEY) is None  # released after its run


def test_a_backlog_longer_than_a_page_does_not_hide_a_lost_query(app, ctx, monkeypatch):
    monkeypatch.setattr(redeliver, "BATCH", 2)
    queued = [publish(app, ctx) for _ in range(5)]  # waiting their turn: three pages of two
    lost = publish(app, ctx, model_id="m2")  # the newest, on another queue
    lose(ctx, "m2")
    now = time.time()
    redeliver.redeliver(ctx, app, now=now + GRACE + 1)
    report = redeliver.redeliver(ctx, app, now=now + 2 * GRACE + 2)
    assert report.sent == [lost]
    assert sorted(queued_ids(ctx)) == sorted(queued)


def test_a_mark_never_brings_back_a_forgotten_record(app, ctx):
    query_id = publish(app, ctx)
    inflight.forget(ctx.store.redis, query_id)
    inflight.mark_missing(ctx.store.redis, query_id, time.time())
    inflight.mark_sent(ctx.store.redis, query_id)
    assert not ctx.store.redis.exists(INFLIGHT_PREFIX + query_id)


def test_a_lost_batch_is_sent_again_as_a_batch(app, ctx):
    import json

    from cipherpool.names import QUERY_BATCH_TASK

    batch_id = str(uuid.uuid4())
    publish_query(
        app, request_for(), "cpu", 300.0, task_id=batch_id, model_name="digits", keep=ctx.store.redis, task=QUERY_BATCH_TASK
    )
    record = inflight.load(ctx.store.redis, [batch_id])[batch_id]
    assert record is not None and record.message.task == QUERY_BATCH_TASK  # one record for the whole batch
    lose(ctx)
    now = time.time()
    redeliver.redeliver(ctx, app, now=now + GRACE + 1)
    assert redeliver.redeliver(ctx, app, now=now + 2 * GRACE + 2).sent == [batch_id]
    again = json.loads(ctx.broker_redis.lindex(queue_name(), 0))
    assert again["headers"]["task"] == QUERY_BATCH_TASK and again["headers"]["id"] == batch_id
