"""The query hot path on a node, with the fake evaluator and an in-memory store."""

import struct

import pytest

from cipherpool import errors
from cipherpool.db.tables import ModelStatus
from cipherpool.fhe.deployment import Versions
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryRequest
from cipherpool.services import accounts, models, queries, tokens
from cipherpool.store import BlobKind, sha256_hex
from cipherpool.workers.context import PlatformContext
from cipherpool.workers.node import Binding, NodeRuntime
from cipherpool.workers.query import NotBoundHere, execute


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
    def __init__(self, settings, db_url, store):
        super().__init__(settings)
        self.__dict__["db_url"], self.__dict__["store"] = db_url, store


@pytest.fixture
def world(settings, db_url, session):
    account, _ = accounts.create_account(session, "a")
    model = models.deploy_model(session, account, "m", client_blob="c", server_blob="s", versions=Versions("1", "1", "3.11"))
    models.set_status(session, account, "m", ModelStatus.ACTIVE)
    token, value = tokens.create_token(session, account, "t", "m")
    store = MemoryStore()
    key = capnp(4)
    blob_id = store.put(BlobKind.EVALUATION_KEY, key)
    key_id = "a" * 32
    queries.register_key(session, token, key_id, blob_id, len(key))
    session.commit()
    evaluator = FakeEvaluator()
    runtime = NodeRuntime("n1", host_class="cpu", concurrency=1, threads=1, key_cache_bytes=10**6,
                          key_memory_factor=1.0, evaluator_factory=lambda *_: evaluator)
    runtime.set_binding(Binding("w1", model.id, "m", "q", evaluator))
    ctx = Ctx(settings, db_url, store)
    return ctx, runtime, evaluator, model.id, value, key_id, account


def request(model_id, token, key_id, data=None, env_model=None, env_key=None, **kw):
    body = EncryptedInput(env_model or model_id, env_key or key_id, data if data is not None else capnp(2)).encode()
    return QueryRequest(token=token, model_id=model_id, key_id=key_id, input=body, **kw)


def test_a_query_runs_and_the_key_is_deserialized_once(world):
    ctx, runtime, evaluator, model_id, token, key_id, _ = world
    first = execute(ctx, runtime, request(model_id, token, key_id))
    second = execute(ctx, runtime, request(model_id, token, key_id))
    assert (first.key_cache, second.key_cache) == ("miss", "hit")
    assert evaluator.key_loads == 1 and evaluator.runs == 2
    out = EncryptedOutput.decode(second.output)
    assert (out.model_id, out.key_id) == (model_id, key_id)
    assert runtime.stats()["key_cache"]["hits"] == 1


def test_large_payloads_travel_by_reference(world):
    ctx, runtime, _, model_id, token, key_id, _ = world
    ctx.settings.inline_max_bytes = 0
    body = request(model_id, token, key_id).input
    reply = execute(ctx, runtime, QueryRequest(token=token, model_id=model_id, key_id=key_id,
                                               input_ref=ctx.store.put_payload(body, 60)))
    assert reply.output is None and EncryptedOutput.decode(ctx.store.get_payload(reply.output_ref))


@pytest.mark.parametrize(
    "change, error",
    [
        ({"token": "cpt_unknown"}, errors.InvalidToken),
        ({"key_id": "f" * 32}, errors.EvaluationKeyNotFound),
        ({"env_key": "e" * 32}, errors.KeyMismatch),
        ({"env_model": "other"}, errors.ModelMismatch),
        ({"data": b"short"}, errors.MalformedCiphertext),
        ({"data": capnp(3)[:-4]}, errors.MalformedCiphertext),
    ],
)
def test_bad_queries_are_refused_with_typed_errors_and_the_node_keeps_serving(world, change, error):
    ctx, runtime, _, model_id, token, key_id, _ = world
    args = {"model_id": model_id, "token": token, "key_id": key_id, **change}
    with pytest.raises(error):
        execute(ctx, runtime, request(**args))
    assert execute(ctx, runtime, request(model_id, token, key_id)).output


def test_a_query_for_another_model_is_handed_back(world):
    ctx, runtime, _, model_id, token, key_id, _ = world
    with pytest.raises(NotBoundHere):
        execute(ctx, runtime, request("someothermodel", token, key_id))
    runtime.set_binding(None)
    with pytest.raises(NotBoundHere):
        execute(ctx, runtime, request(model_id, token, key_id))


def test_clients_with_identical_evaluation_keys_stay_distinct_but_share_the_cache(world):
    # Models without bootstrapping give every client the same evaluation key bytes.
    ctx, runtime, evaluator, model_id, token, key_id, _ = world
    with ctx.session() as s:
        token_row = tokens.resolve_token(s, token)[0]
        queries.register_key(s, token_row, "b" * 32, sha256_hex(capnp(4)), 40)
    execute(ctx, runtime, request(model_id, token, key_id))
    execute(ctx, runtime, request(model_id, token, "b" * 32))
    assert evaluator.key_loads == 1  # one deserialized key serves both
    with pytest.raises(errors.KeyMismatch):
        execute(ctx, runtime, request(model_id, token, "b" * 32, env_key=key_id))


def test_inactive_model_refuses_queries(world):
    ctx, runtime, _, model_id, token, key_id, account = world
    with ctx.session() as s:
        models.set_status(s, account, "m", ModelStatus.INACTIVE)
    with pytest.raises(errors.ModelInactive):
        execute(ctx, runtime, request(model_id, token, key_id))
