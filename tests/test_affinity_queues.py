"""Key-affinity queues on a real broker (cipherpool.affinity_queues, scheduler.rehome): a query
routed to a node waits in that node's queue of its model; what a node stops taking moves to
the model's own queue intact (same id, deadline, body); beat moves only what no node
consumes, and redelivery looks in both queues, so a moved query is never sent twice. On a
real redis-server of the test's own, and on the machine's RabbitMQ where it runs."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from kombu import Connection

from cipherpool import affinity_queues
from cipherpool.affinity import Choice
from cipherpool.config.celery import create_app
from cipherpool.config.settings import Settings
from cipherpool.db.tables import Model, PoolNode, Worker, WorkerStatus
from cipherpool.dispatch import publish_query, query_queue
from cipherpool.messages import QueryRequest
from cipherpool.monitoring.depth import model_depth
from cipherpool.names import affinity_queue, affinity_routing_key, model_queue_of_affinity
from cipherpool.scheduler import redeliver
from cipherpool.services import accounts
from cipherpool.statuses import NodeStatus
from tests.helpers import own_redis, redis_broker_platform

GRACE = 10.0
NODE, OTHER = "node1@host-a", "node2@host-b"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with own_redis(tmp_path_factory, "affinity") as url:
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


def request_for(model_id: str) -> QueryRequest:
    return QueryRequest(token_id="t1", model_id=model_id, key_id="k1", blob_id="b1", input=b"\x01" * 64, submitted_at=time.time())


def publish(app, model_id: str = "m1", node: str | None = NODE, keep=None) -> str:
    query_id = str(uuid.uuid4())
    routed = Choice(node, False) if node is not None else None
    publish_query(app, request_for(model_id), "cpu", 300.0, task_id=query_id, model_name="digits", keep=keep, routed=routed)
    return query_id


def ids_in(ctx, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in ctx.broker_redis.lrange(queue, 0, -1)]


def test_an_affinity_queue_names_its_model_and_node_and_leads_back_to_the_models_queue():
    queue = affinity_queue("cpu", "m1", "node1@host-a")
    assert queue == "cipherpool.affinity.cpu.m1@node1@host-a"  # a node name may hold an "@"
    assert model_queue_of_affinity(queue) == (query_queue("cpu", "m1").name, "cpu.m1")
    assert affinity_routing_key("cpu", "m1", "n@h") == "cpu.m1@n@h"
    for other in (query_queue("cpu", "m1").name, "cipherpool.affinity.cpu.m1", "cipherpool.affinity.@n"):
        assert model_queue_of_affinity(other) is None


def test_a_routed_query_waits_in_its_nodes_queue_and_moves_to_the_models_queue_intact(app, ctx):
    query_id = publish(app)
    mine, models_queue = affinity_queue("cpu", "m1", NODE), query_queue("cpu", "m1").name
    assert ids_in(ctx, mine) == [query_id] and ids_in(ctx, models_queue) == []
    before = json.loads(ctx.broker_redis.lindex(mine, 0))

    assert affinity_queues.move(app, mine) == 1
    assert ids_in(ctx, mine) == [] and ids_in(ctx, models_queue) == [query_id]
    after = json.loads(ctx.broker_redis.lindex(models_queue, 0))
    assert after["body"] == before["body"]  # the same request, byte for byte
    assert before["headers"]["cipherpool_placement"] == "home"  # what the node reads as task.request.cipherpool_placement
    for header in ("id", "task", "expires", "shadow", "cipherpool_placement"):
        assert after["headers"][header] == before["headers"][header]
    assert after["properties"]["delivery_info"]["routing_key"] == "cpu.m1"
    assert ctx.broker_redis.hlen("unacked") == 0, "each moved message was acknowledged"

    assert affinity_queues.move(app, mine) == 0  # nothing left
    assert affinity_queues.move(app, affinity_queue("cpu", "m1", "never@used")) == 0
    assert not ctx.broker_redis.exists(affinity_queue("cpu", "m1", "never@used"))  # looking creates nothing
    assert affinity_queues.move(app, models_queue) == 0  # not an affinity queue: left alone
    assert ids_in(ctx, models_queue) == [query_id]


def test_beat_moves_only_what_no_node_consumes_and_forgets_a_queue_long_unused(app, ctx):
    mine, other = affinity_queue("cpu", "m1", NODE), affinity_queue("cpu", "m1", OTHER)
    t0 = time.time()
    affinity_queues.register(ctx.store.redis, mine, t0)
    affinity_queues.register(ctx.store.redis, other, t0)
    kept, stranded = publish(app, node=NODE), publish(app, node=OTHER)

    report = affinity_queues.rescue(ctx.store.redis, app, {mine}, watch_s=100.0, now=t0 + 5)
    assert report.moved == {other: 1} and report.forgotten == []
    assert ids_in(ctx, mine) == [kept] and ids_in(ctx, query_queue("cpu", "m1").name) == [stranded]
    assert affinity_queues.registered(ctx.store.redis) == {mine: t0 + 5, other: t0}  # seen consumed now

    late = affinity_queues.rescue(ctx.store.redis, app, {mine}, watch_s=100.0, now=t0 + 101)
    assert late.forgotten == [other] and set(affinity_queues.registered(ctx.store.redis)) == {mine}
    affinity_queues.register(ctx.store.redis, other, t0)  # a late restore must still be caught while watched
    publish(app, node=OTHER)
    assert affinity_queues.rescue(ctx.store.redis, app, {mine}, watch_s=100.0, now=t0 + 200).moved == {other: 1}
    assert other in affinity_queues.registered(ctx.store.redis), "a queue that held queries is watched on"


def test_the_models_depth_counts_its_nodes_affinity_queues(app, ctx):
    model = Model(id="m1", account_id="a", name="digits", hardware="cpu")
    publish(app, node=None)
    publish(app, node=NODE)
    publish(app, node=OTHER)
    publish(app, model_id="m2", node=NODE)  # another model's: not counted
    assert model_depth(app, model) == 1  # without the registry: the model's own queue only
    for queue in (affinity_queue("cpu", "m1", NODE), affinity_queue("cpu", "m1", OTHER), affinity_queue("cpu", "m2", NODE)):
        affinity_queues.register(ctx.store.redis, queue)
    assert model_depth(app, model, ctx.store.redis) == 3


def test_a_query_moved_off_its_node_is_found_by_redelivery_never_sent_twice(app, ctx):
    publish(app, keep=ctx.store.redis)
    affinity_queues.move(app, affinity_queue("cpu", "m1", NODE))
    now = time.time()
    for step in range(4):
        report = redeliver.redeliver(ctx, app, now=now + GRACE + 1 + step * GRACE)
        assert report.sent == [] and report.missing == 0


def test_a_lost_routed_query_is_sent_again_to_its_models_queue(app, ctx):
    query_id = publish(app, keep=ctx.store.redis)
    assert ctx.broker_redis.rpop(affinity_queue("cpu", "m1", NODE)) is not None  # lost on the way to its node
    now = time.time()
    redeliver.redeliver(ctx, app, now=now + GRACE + 1)
    assert redeliver.redeliver(ctx, app, now=now + 2 * GRACE + 2).sent == [query_id]
    assert ids_in(ctx, query_queue("cpu", "m1").name) == [query_id]  # not back to the node that may be why
    assert ids_in(ctx, affinity_queue("cpu", "m1", NODE)) == []


def test_the_queues_consumed_are_those_of_workers_up_on_online_nodes(session):
    account, _ = accounts.create_account(session, "alice")
    model = Model(account_id=account.id, name="digits", hardware="cpu")
    session.add(model)
    session.flush()
    rows = [("up@a", NodeStatus.ONLINE, WorkerStatus.UP), ("standby@b", NodeStatus.ONLINE, WorkerStatus.STANDBY)]
    rows += [("offline@c", NodeStatus.OFFLINE, WorkerStatus.UP), ("loading@d", NodeStatus.ONLINE, WorkerStatus.LOADING)]
    for name, node_status, worker_status in rows:
        session.add(PoolNode(name=name, host_class="cpu", status=node_status))
        session.flush()
        session.add(Worker(account_id=account.id, model_id=model.id, node_name=name, status=worker_status))
    session.flush()
    assert affinity_queues.consumed(session) == {affinity_queue("cpu", model.id, "up@a")}


def _rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_on_rabbitmq_a_routed_query_moves_to_the_models_queue_intact(tmp_path, redis_url):
    settings = Settings(data_dir=tmp_path, broker_url="amqp://guest:guest@127.0.0.1:5672//", result_backend=redis_url)
    app = create_app(settings, name=f"test-{uuid.uuid4().hex[:6]}")
    model_id = f"m{uuid.uuid4().hex[:12]}"
    mine, models_queue = affinity_queue("cpu", model_id, NODE), query_queue("cpu", model_id).name
    try:
        query_id = publish(app, model_id=model_id)
        assert affinity_queues.move(app, mine) == 1
        with Connection(settings.broker_url) as conn:
            message = query_queue("cpu", model_id)(conn.default_channel).get(no_ack=True)
            assert message is not None and message.headers["id"] == query_id and message.headers["expires"]
            assert message.delivery_info["routing_key"] == f"cpu.{model_id}"
        assert affinity_queues.move(app, mine) == 0
        assert affinity_queues.move(app, affinity_queue("cpu", model_id, "never@used")) == 0  # no such queue: 0
    finally:
        with Connection(settings.broker_url) as conn:
            for queue in (mine, models_queue):
                try:
                    conn.default_channel.queue_delete(queue)
                except Exception:  # noqa: BLE001 - best effort
                    pass
        app.close()
