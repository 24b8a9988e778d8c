"""The query hot path on a node, with the fake evaluator and an in-memory store.

The node makes no database round trip: a query reaches it authorised, naming the token by
id and the evaluation key by its blob id. What the node still checks is the ciphertext itself.
"""

import struct
from types import SimpleNamespace

import pytest

from cipherpool import errors
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryRequest
from cipherpool.names import POOL_QUEUE, model_queue
from cipherpool.store import BlobKind, sha256_hex
from cipherpool.workers.context import PlatformContext
from cipherpool.workers.node import Binding, NodeRuntime
from cipherpool.workers.query import NotBoundHere, execute, may_requeue

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


@pytest.fixture
def world(settings):
    store = MemoryStore()
    blob_id = store.put(BlobKind.EVALUATION_KEY, capnp(4))
    evaluator = FakeEvaluator()
    runtime = NodeRuntime("n1", host_class="cpu", concurrency=1, threads=1, key_cache_bytes=10**6,
                          key_memory_factor=1.0, evaluator_factory=lambda *_: evaluator)
    runtime.set_binding(Binding("w1", MODEL, "m", "q", evaluator))
    return Ctx(settings, store), runtime, evaluator, blob_id


def request(blob_id, model_id=MODEL, key_id=KEY_ID, data=None, env_model=None, env_key=None, **kw):
    body = EncryptedInput(env_model or model_id, env_key or key_id, data if data is not None else capnp(2)).encode()
    return QueryRequest(token_id="t1", model_id=model_id, key_id=key_id, blob_id=blob_id, input=body, **kw)


def test_a_query_runs_and_the_key_is_deserialized_once(world):
    ctx, runtime, evaluator, blob_id = world
    first = execute(ctx, runtime, request(blob_id))
    second = execute(ctx, runtime, request(blob_id))
    assert (first.key_cache, second.key_cache) == ("miss", "hit")
    assert evaluator.key_loads == 1 and evaluator.runs == 2
    out = EncryptedOutput.decode(second.output)
    assert (out.model_id, out.key_id) == (MODEL, KEY_ID)
    assert runtime.stats()["key_cache"]["hits"] == 1


def test_large_payloads_travel_by_reference(world):
    ctx, runtime, _, blob_id = world
    ctx.settings.inline_max_bytes = 0
    body = request(blob_id).input
    reply = execute(ctx, runtime, QueryRequest(token_id="t1", model_id=MODEL, key_id=KEY_ID, blob_id=blob_id,
                                               input_ref=ctx.store.put_payload(body, 60)))
    assert reply.output is None and EncryptedOutput.decode(ctx.store.get_payload(reply.output_ref))


@pytest.mark.parametrize(
    "change, error",
    [
        ({"blob_id": "f" * 64}, errors.NotFound),  # the key's blob is gone from the store
        ({"env_key": "e" * 32}, errors.KeyMismatch),
        ({"env_model": "other"}, errors.ModelMismatch),
        ({"data": b"short"}, errors.MalformedCiphertext),
        ({"data": capnp(3)[:-4]}, errors.MalformedCiphertext),
    ],
)
def test_bad_queries_are_refused_with_typed_errors_and_the_node_keeps_serving(world, change, error):
    ctx, runtime, _, blob_id = world
    args = {"blob_id": blob_id, **change}
    with pytest.raises(error):
        execute(ctx, runtime, request(**args))
    assert execute(ctx, runtime, request(blob_id)).output


def test_a_query_for_another_model_is_handed_back(world):
    ctx, runtime, _, blob_id = world
    with pytest.raises(NotBoundHere):
        execute(ctx, runtime, request(blob_id, model_id="someothermodel"))
    runtime.set_binding(None)
    with pytest.raises(NotBoundHere):
        execute(ctx, runtime, request(blob_id))


def test_clients_with_identical_evaluation_keys_stay_distinct_but_share_the_cache(world):
    # Models without bootstrapping give every client the same evaluation key bytes.
    ctx, runtime, evaluator, blob_id = world
    execute(ctx, runtime, request(blob_id))
    execute(ctx, runtime, request(blob_id, key_id="b" * 32))
    assert evaluator.key_loads == 1  # one deserialized key serves both
    with pytest.raises(errors.KeyMismatch):
        execute(ctx, runtime, request(blob_id, key_id="b" * 32, env_key=KEY_ID))


@pytest.mark.parametrize("routing_key, expires, requeued", [
    (model_queue(MODEL), "2030-01-01T00:00:00", True),   # prefetched before an unbind: back to its queue
    (model_queue(MODEL), None, False),                    # no deadline: could bounce forever
    (POOL_QUEUE, "2030-01-01T00:00:00", False),           # arrived through another queue
    (None, "2030-01-01T00:00:00", False),
])
def test_only_a_query_from_its_own_queue_with_a_deadline_goes_back(routing_key, expires, requeued):
    task_request = SimpleNamespace(delivery_info={"routing_key": routing_key}, expires=expires)
    assert may_requeue(task_request, MODEL) is requeued
