"""The query hot path on a node, with the fake evaluator and an in-memory store.

The node makes no database round trip: a query reaches it authorised, naming the token by
id and the evaluation key by its blob id. What the node still checks is the ciphertext itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from cipherpool import errors
from cipherpool.context import PlatformContext
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest, unwrap
from cipherpool.names import POOL_QUEUE, affinity_queue, affinity_routing_key, model_queue, query_routing_key
from cipherpool.store import BlobKind, sha256_hex
from cipherpool.workers.hooks import BindingEvent, Hook
from cipherpool.workers.node import Binding, NodeRuntime
from cipherpool.workers.query import Delivery, Requeue, handle, may_requeue
from tests.helpers import value_ciphertext

MODEL, KEY_ID = "m" * 16, "a" * 32


def capnp(words: int) -> bytes:
    return struct.pack("<II", 0, words) + b"\x07" * (8 * words)


class MemoryStore:
    def __init__(self):
        self.blobs, self.payloads = {}, {}

    def put(self, kind, data):
        self.blobs[(kind, sha256_hex(data))] = data
        return sha256_hex(data)

    def get(self, kind, blob_id):
        if (kind, blob_id) not in self.blobs:
            raise errors.NotFound("missing")
        return self.blobs[(kind, blob_id)]

    def put_payload(self, data, ttl_s):
        ref = f"p{len(self.payloads)}"
        self.payloads[ref] = data
        return ref

    def get_payload(self, ref):
        if ref not in self.payloads:
            raise errors.NotFound("expired")
        return self.payloads[ref]


class Ctx(PlatformContext):
    def __init__(self, settings, store):
        super().__init__(settings)
        self.__dict__["store"] = store

    def session(self):
        raise AssertionError("the hot path must not touch the database")


@dataclass
class World:
    ctx: Ctx
    runtime: NodeRuntime
    evaluator: FakeEvaluator
    blob_id: str
    hook: Recorder


class Recorder(Hook):
    """Remembers every moment it hears, in order, with the query's ids."""

    def __init__(self):
        self.moments: list[tuple[str, str | None]] = []
        self.refusals: list[str] = []

    def query_received(self, query):
        self.moments.append(("received", query.worker_id))

    def query_authorised(self, query):
        self.moments.append(("authorised", query.worker_id))

    def key_loaded(self, query, *, hit, seconds):
        self.moments.append(("key " + ("hit" if hit else "miss"), query.worker_id))

    def query_computed(self, query):
        assert {"queue_wait_s", "key_s", "compute_s", "server_total_s"} <= set(query.timings)
        self.moments.append(("computed", query.worker_id))

    def query_refused(self, query, error):
        self.moments.append(("refused", query.worker_id))
        self.refusals.append(error.code)

    def query_failed(self, query, error):
        self.moments.append(("failed", query.worker_id))

    def query_requeued(self, query):
        self.moments.append(("requeued", query.worker_id))

    def model_loaded(self, binding, *, seconds):
        self.moments.append(("model loaded", binding.worker_id))

    def binding_bound(self, binding):
        self.moments.append(("bound", binding.worker_id))

    def binding_unbound(self, binding):
        self.moments.append(("unbound", binding.worker_id))


def bind_fake(runtime: NodeRuntime, evaluator, worker_id: str = "w1", model_id: str = MODEL) -> None:
    """What workers/binding.py does on a node, minus the database and the broker."""
    event = BindingEvent(runtime.name, worker_id, model_id, "m")
    runtime.load_evaluator(event, b"server.zip", None)
    runtime.set_binding(Binding(worker_id, model_id, "m", model_queue("cpu", model_id), evaluator, runtime.name))
    runtime.hooks.binding_bound(event)


@pytest.fixture
def world(settings) -> World:
    store = MemoryStore()
    blob_id = store.put(BlobKind.EVALUATION_KEY, capnp(4))
    evaluator = FakeEvaluator()
    hook = Recorder()
    runtime = NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
        hooks=[hook],
    )
    bind_fake(runtime, evaluator)
    return World(Ctx(settings, store), runtime, evaluator, blob_id, hook)


OWN_QUEUE = Delivery(task_id="q1", routing_key=query_routing_key("cpu", MODEL), expires="2030-01-01T00:00:00")


def request(blob_id, model_id=MODEL, key_id=KEY_ID, data=None, env_model=None, env_key=None, **kw):
    body = EncryptedInput(env_model or model_id, env_key or key_id, data if data is not None else value_ciphertext()).encode()
    return QueryRequest(token_id="t1", model_id=model_id, key_id=key_id, blob_id=blob_id, input=body, **kw)


def run(w: World, req: QueryRequest | object, delivery: Delivery = OWN_QUEUE) -> QueryReply:
    """One message through the node's whole path; the reply, or the typed refusal raised."""
    raw = req.encode() if isinstance(req, QueryRequest) else req
    return QueryReply.decode(unwrap(handle(w.ctx, w.runtime, raw, delivery)))


def test_a_query_runs_and_the_key_is_deserialized_once(world):
    first, second = run(world, request(world.blob_id)), run(world, request(world.blob_id))
    assert (first.key_cache, second.key_cache) == ("miss", "hit")
    assert world.evaluator.key_loads == 1 and world.evaluator.runs == 2
    out = EncryptedOutput.decode(second.output)
    assert (out.model_id, out.key_id) == (MODEL, KEY_ID)
    report = world.runtime.report().model_dump()
    assert (report["key_cache_misses"], report["key_cache_hits"], report["queries_succeeded"]) == (1, 1, 2)


def test_hooks_hear_every_moment_in_order(world):
    run(world, request(world.blob_id))
    assert world.hook.moments == [
        ("model loaded", "w1"),
        ("bound", "w1"),
        ("received", "w1"),
        ("authorised", "w1"),
        ("key miss", "w1"),
        ("computed", "w1"),
    ]


def test_refusals_reach_the_hooks_though_they_are_results(world):
    with pytest.raises(errors.KeyMismatch):
        run(world, request(world.blob_id, env_key="e" * 32))
    with pytest.raises(errors.InvalidInput):
        run(world, {"not": "a request"})
    assert world.hook.refusals == ["key_mismatch", "invalid_input"]
    assert world.hook.moments[-2:] == [("received", "w1"), ("refused", "w1")]
    assert world.runtime.report().model_dump()["queries_refused"] == 2


def test_a_failing_hook_never_costs_an_answer(world):
    class Broken(Hook):
        def query_computed(self, query):
            raise RuntimeError("metrics backend down")

    world.runtime.hooks.add(Broken())
    assert run(world, request(world.blob_id)).output
    assert world.runtime.report().model_dump()["queries_succeeded"] == 1


def test_an_unexpected_error_fails_the_task_and_is_heard(world):
    world.evaluator.run = lambda *_: (_ for _ in ()).throw(RuntimeError("concrete crashed"))
    with pytest.raises(RuntimeError):
        run(world, request(world.blob_id))
    assert world.hook.moments[-1] == ("failed", "w1") and world.runtime.report().model_dump()["queries_failed"] == 1


def test_figures_cover_only_the_current_binding(world):
    for _ in range(3):
        run(world, request(world.blob_id))
    world.runtime.set_binding(None)
    world.runtime.hooks.binding_unbound(BindingEvent("n1", "w1", MODEL, "m"))
    other = "o" * 16
    bind_fake(world.runtime, world.evaluator, worker_id="w2", model_id=other)
    run(world, request(world.blob_id, model_id=other), Delivery(routing_key=query_routing_key("cpu", other)))
    report = world.runtime.report().model_dump()
    assert report["worker_id"] == "w2"
    assert (report["queries_succeeded"], report["model_loads"], report["key_cache_misses"]) == (1, 1, 1)
    lifetime = report["node_lifetime"]
    assert (lifetime["queries_succeeded"], lifetime["model_loads"], lifetime["key_cache_misses"]) == (4, 2, 2)


def test_large_payloads_travel_by_reference(world):
    world.ctx.settings.inline_max_bytes = 0
    body = request(world.blob_id).input
    reply = run(
        world,
        QueryRequest(
            token_id="t1", model_id=MODEL, key_id=KEY_ID, blob_id=world.blob_id, input_ref=world.ctx.store.put_payload(body, 60)
        ),
    )
    assert reply.output is None and reply.output_ref
    out = EncryptedOutput.decode(world.ctx.store.get_payload(reply.output_ref))
    assert (out.model_id, out.key_id) == (MODEL, KEY_ID)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"blob_id": "f" * 64}, errors.NotFound),  # the key's blob is gone from the store
        ({"env_key": "e" * 32}, errors.KeyMismatch),
        ({"env_model": "other"}, errors.ModelMismatch),
        ({"data": b"short"}, errors.MalformedCiphertext),
        ({"data": capnp(3)[:-4]}, errors.MalformedCiphertext),
        ({"data": capnp(4)}, errors.InvalidCiphertext),  # well framed, but no value in it
        ({"data": struct.pack("<II", 0, 4) + bytes(32)}, errors.InvalidCiphertext),  # a message of zeros: no payload
        ({"data": value_ciphertext(data=b"x" * 10)}, errors.InvalidCiphertext),  # payload and shape disagree
    ],
)
def test_bad_queries_are_refused_with_typed_errors_and_the_node_keeps_serving(world, change, error):
    with pytest.raises(error):
        run(world, request(**{"blob_id": world.blob_id, **change}))
    assert run(world, request(world.blob_id)).output


def test_a_query_for_another_model_is_handed_back_or_refused(world):
    other = "someothermodel00"
    with pytest.raises(Requeue):  # through its own queue, with a deadline: back to it
        run(
            world,
            request(world.blob_id, model_id=other),
            Delivery(routing_key=query_routing_key("cpu", other), expires="2030-01-01T00:00:00"),
        )
    with pytest.raises(errors.ModelUnavailable):  # anything else: refused, never bounced
        run(world, request(world.blob_id, model_id=other), Delivery(routing_key=POOL_QUEUE))
    world.runtime.set_binding(None)
    with pytest.raises(Requeue):
        run(world, request(world.blob_id))
    assert world.hook.moments[2:] == [
        ("received", "w1"),
        ("requeued", "w1"),
        ("received", "w1"),
        ("refused", "w1"),
        ("received", None),
        ("requeued", None),
    ]
    report = world.runtime.report().model_dump()["node_lifetime"]
    assert (report["queries_requeued"], report["queries_refused"]) == (2, 1)


def test_clients_with_identical_evaluation_keys_stay_distinct_but_share_the_cache(world):
    # Models without bootstrapping give every client the same evaluation key bytes.
    run(world, request(world.blob_id))
    run(world, request(world.blob_id, key_id="b" * 32))
    assert world.evaluator.key_loads == 1  # one deserialized key serves both
    with pytest.raises(errors.KeyMismatch):
        run(world, request(world.blob_id, key_id="b" * 32, env_key=KEY_ID))


@pytest.mark.parametrize(
    "routing_key, expires, requeued",
    [
        (query_routing_key("cpu", MODEL), "2030-01-01T00:00:00", True),  # prefetched before an unbind: back
        (query_routing_key("cpu", MODEL), None, False),  # no deadline: could bounce forever
        (query_routing_key("gpu", MODEL), "2030-01-01T00:00:00", False),  # another class's key: not this queue
        (POOL_QUEUE, "2030-01-01T00:00:00", False),  # arrived through another queue
        (None, "2030-01-01T00:00:00", False),
        (model_queue("cpu", MODEL), "2030-01-01T00:00:00", True),  # as Celery publishes: the queue's name
        (affinity_queue("cpu", MODEL, "n1@h"), "2030-01-01T00:00:00", True),
        (affinity_routing_key("cpu", MODEL, "n1@h"), "2030-01-01T00:00:00", True),  # this node's affinity queue: beat moves it
        (affinity_routing_key("cpu", MODEL, "n2@h"), "2030-01-01T00:00:00", False),  # another node's: not this node's to put back
        (affinity_routing_key("cpu", MODEL, "n1@h"), None, False),
    ],
)
def test_only_a_query_from_its_own_queue_with_a_deadline_goes_back(routing_key, expires, requeued):
    task_request = SimpleNamespace(id="q1", delivery_info={"routing_key": routing_key}, expires=expires)
    assert may_requeue(Delivery.of(task_request), "cpu", MODEL, "n1@h") is requeued
