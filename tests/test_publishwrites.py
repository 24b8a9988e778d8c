"""A query's publish made as writes inside the admission script (cipherpool/publishwrites.py),
on a real redis-server: the writes collected are the ones Celery and kombu would have made (the
same message, the same event), nothing is sent while they are collected, and made by the
admission script they queue a message a node's consumer reads as the task, or, over the
token's quota, queue nothing."""

from __future__ import annotations

import base64
import json
import logging

import pytest
import redis
from celery import Celery
from celery.worker.request import Request

from cipherpool.config.celery import create_app
from cipherpool.config.settings import Settings
from cipherpool.dispatch import PLACEMENT_HEADER, _send_query, query_message, query_queue
from cipherpool.errors import QuotaExceeded
from cipherpool.messages import QueryRequest, redacted_kwargs
from cipherpool.publishwrites import QueryPublish, comparable, fusable, writes_of
from cipherpool.services import usage
from tests.helpers import own_redis

MODEL_ID = "0123456789abcdef"
SENT_TOPIC = "/0.celeryev/task.sent"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with own_redis(tmp_path_factory, "publishwrites") as found:
        yield found


@pytest.fixture
def app(url, tmp_path):
    made = create_app(Settings(data_dir=tmp_path, broker_url=url))
    yield made
    made.close()


def _message(task_id: str):
    request = QueryRequest(token_id="t", model_id=MODEL_ID, key_id="k" * 32, blob_id="b", input=b"\x01" * 64)
    return query_message(request, "cpu", 60, False, model_name="digits")[0]


def _published(app: Celery, client: redis.Redis, task_id: str, message) -> tuple[bytes, bytes]:
    """What a real publish leaves: the queued message and the task-sent event heard."""
    listener = client.pubsub()
    listener.subscribe(SENT_TOPIC)
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    _send_query(app, task_id, message)
    event = listener.get_message(timeout=2)
    listener.close()
    return client.rpop(message.queue), event["data"]


def _consumed(app: Celery):
    """The next message on the model's queue, as a node's consumer reads it (acknowledged)."""
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(query_queue("cpu", MODEL_ID), accept=["msgpack"])
        try:
            got = simple.get(timeout=2)
            got.ack()
            return got
        finally:
            simple.close()


def _same(ours: bytes | str, theirs: bytes | str, volatile: set[str]) -> None:
    a, b = json.loads(ours), json.loads(theirs)
    for envelope in (a, b):
        envelope["properties"].pop("delivery_tag")  # a uuid per publish
    expirations = [float(e["properties"].pop("expiration", 0)) for e in (a, b)]  # ms left to the deadline, at publish
    assert abs(expirations[0] - expirations[1]) < 5000
    if volatile:  # an event's body: its clock and time differ from one publish to the next
        bodies = [json.loads(base64.b64decode(e.pop("body"))) for e in (a, b)]
        for body in bodies:
            for field in volatile:
                assert field in body
                body.pop(field)
        assert bodies[0] == bodies[1]
    assert a == b


def test_the_writes_are_celerys_own_and_none_is_made_while_collected(app, url):
    client = redis.Redis.from_url(url)
    message = _message("q-1")
    queued, event = _published(app, client, "q-1", message)

    writes = writes_of(app, lambda producer: _send_query(app, "q-1", message, producer=producer))
    assert client.llen(message.queue) == 0  # collected, not sent
    assert [w[:2] for w in writes] == [("LPUSH", message.queue), ("PUBLISH", SENT_TOPIC)]
    _same(writes[0][2], queued, set())
    _same(writes[1][2], event, {"clock", "timestamp"})
    # The producer went back to Celery's pool with no batch left on it.
    with app.producer_or_acquire() as producer:
        assert getattr(producer._batch_local, "current", None) is None


def test_made_by_the_admission_script_they_queue_the_task_or_nothing_over_quota(app, url):
    client = redis.Redis.from_url(url)
    message = _message("q-2")
    writes = writes_of(app, lambda producer: _send_query(app, "q-2", message, producer=producer))
    listener = client.pubsub()
    listener.subscribe(SENT_TOPIC)
    assert listener.get_message(timeout=2)["type"] == "subscribe"

    assert usage.charge(client, "tok-2", 1, then=writes) == 1
    assert listener.get_message(timeout=2)["channel"] == SENT_TOPIC.encode()
    got = _consumed(app)
    assert (got.headers["id"], got.headers["task"], got.headers["shadow"]) == ("q-2", message.task, message.shadow)
    assert got.payload[1] == message.kwargs

    with pytest.raises(QuotaExceeded):  # at its quota: counted nothing, queued nothing, told nobody
        usage.charge(client, "tok-2", 1, then=writes)
    assert client.llen(message.queue) == 0 and listener.get_message(timeout=0.3) is None
    listener.close()


def test_only_a_broker_that_is_the_platforms_own_redis_takes_the_writes(app, url, tmp_path):
    assert fusable(Settings(data_dir=tmp_path, broker_url=url), app)
    assert fusable(Settings(data_dir=tmp_path, broker_url=url, store_url=url), app)
    assert not fusable(Settings(data_dir=tmp_path, broker_url=url, store_url=url.replace("/0", "/1")), app)
    assert not fusable(Settings(data_dir=tmp_path, broker_url="amqp://guest@127.0.0.1//", store_url=url), app)
    assert not fusable(Settings(data_dir=tmp_path, broker_url=f"{url};{url}"), app)
    prefixed = create_app(Settings(data_dir=tmp_path, broker_url=url))
    prefixed.conf.broker_transport_options = {**prefixed.conf.broker_transport_options, "global_keyprefix": "x:"}
    assert not fusable(Settings(data_dir=tmp_path, broker_url=url), prefixed)


@pytest.mark.parametrize("headers", [{}, {PLACEMENT_HEADER: "home"}], ids=["model queue", "routed"])
def test_the_message_built_here_is_celerys_and_proves_itself_once(app, url, headers):
    """:class:`QueryPublish` builds what Celery builds (all but what differs on every publish);
    a shape's first query is built both ways and compared, and later ones are built here only."""
    message = _message("q-3")
    celery_built = writes_of(
        app, lambda producer: _send_query(app, "q-3", message, headers.get(PLACEMENT_HEADER), producer=producer)
    )
    builder = QueryPublish(app)
    ours = builder.build("q-3", message, redacted_kwargs(message.kwargs), headers, SENT_TOPIC)
    assert comparable(ours) == comparable(celery_built)

    calls = []

    def celery_writes():
        calls.append(1)
        return celery_built

    assert builder.writes("q-3", message, redacted_kwargs(message.kwargs), headers, celery_writes) is celery_built
    again = builder.writes("q-3", message, redacted_kwargs(message.kwargs), headers, celery_writes)
    assert len(calls) == 1 and comparable(again) == comparable(celery_built)
    assert builder.proved() == {bool(headers): True}
    # A node's consumer takes the built message as the task, under its shadow name.
    client = redis.Redis.from_url(url)
    assert usage.charge(client, f"tok-3-{len(headers)}", None, then=again) == 1
    got = _consumed(app)

    if message.task not in app.tasks:  # the platform's own is, where another module imported it

        def run(request):  # the query task, as a node's registry has it
            return None

        app.task(name=message.task, shared=False)(run)
    request = Request(got, app=app)
    assert (request.id, request.name, request.task.name) == ("q-3", message.shadow, message.task)
    assert got.payload[1] == message.kwargs and got.headers.get(PLACEMENT_HEADER) == headers.get(PLACEMENT_HEADER)


def test_a_shape_that_fails_its_proof_is_built_by_celery_from_then_on(app, monkeypatch, caplog):
    message = _message("q-4")
    builder = QueryPublish(app)
    build = builder.build
    monkeypatch.setattr(
        builder, "build", lambda *a: [(w[0], w[1], w[2].replace('"lang": "py"', '"lang": "rs"')) for w in build(*a)]
    )

    def celery_writes():
        return writes_of(app, lambda producer: _send_query(app, "q-4", message, producer=producer))

    with caplog.at_level(logging.WARNING, logger="cipherpool.dispatch"):
        builder.writes("q-4", message, redacted_kwargs(message.kwargs), {}, celery_writes)
    assert "differs from Celery's: Celery builds them ([0][2].headers.lang: 'rs' here, 'py' by Celery)" in caplog.text
    assert builder.proved() == {False: False}
    monkeypatch.setattr(builder, "build", lambda *a: pytest.fail("a shape that failed is never built here"))
    assert (
        json.loads(builder.writes("q-4", message, redacted_kwargs(message.kwargs), {}, celery_writes)[0][2])["headers"]["lang"]
        == "py"
    )
