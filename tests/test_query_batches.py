"""Batched queries (issue 27): the framing, and a batch on a node with the fake evaluator.

A batch is many ciphertexts of one model and key set in one task: the node takes the key once,
evaluates the items in order, and an item it cannot evaluate fails alone, in its place.
"""

from __future__ import annotations

import pytest

from cipherpool import errors
from cipherpool.messages import (
    ERROR,
    ITEM,
    EncryptedInput,
    EncryptedOutput,
    QueryReply,
    QueryRequest,
    batch_items,
    error_frame,
    pack_batch,
    unpack_batch,
    unwrap,
)
from cipherpool.names import POOL_QUEUE, query_routing_key
from cipherpool.workers.query import Delivery, Requeue, handle_batch
from tests import test_query_service
from tests.helpers import value_ciphertext
from tests.test_query_service import KEY_ID, MODEL, OWN_QUEUE, World

world = test_query_service.world  # the node's fixture: a fake model bound, an in-memory store

# ---- framing ----------------------------------------------------------------------------


def test_a_batch_frames_round_trip_in_order():
    frames = [(ITEM, b"one"), (ITEM, b""), error_frame(errors.KeyMismatch("not yours")), (ITEM, b"\x00" * 70_000)]
    assert unpack_batch(pack_batch(frames), 10) == frames
    items = batch_items(pack_batch(frames), 10)
    assert items[:2] == [b"one", b""] and items[3] == b"\x00" * 70_000
    assert isinstance(items[2], errors.KeyMismatch) and items[2].message == "not yours"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"CPB1",
        b"XXXX\x01\x00\x00\x00\x00\x01\x00\x00\x00a",  # another magic
        pack_batch([]),  # no item
        pack_batch([(ITEM, b"a")] * 5),  # more than the cap
        pack_batch([(ITEM, b"abc")])[:-1],  # truncated
        pack_batch([(ITEM, b"abc")]) + b"x",  # trailing bytes
        pack_batch([(7, b"abc")]),  # a frame of an unknown kind
        b"CPB1\x02\x00\x00\x00" + pack_batch([(ITEM, b"a")])[8:],  # says 2, holds 1
    ],
)
def test_anything_but_a_batch_is_malformed(body):
    with pytest.raises(errors.MalformedCiphertext):
        unpack_batch(body, 4)


def test_an_unreadable_error_frame_is_still_a_typed_error():
    (item,) = batch_items(pack_batch([(ERROR, b"not json")]), 1)
    assert isinstance(item, errors.RemoteError)


# ---- on a node ---------------------------------------------------------------------------


def envelope(data: bytes | None = None, model_id: str = MODEL, key_id: str = KEY_ID) -> bytes:
    return EncryptedInput(model_id, key_id, data if data is not None else value_ciphertext()).encode()


def batch_request(blob_id: str, items: list[bytes], **kw: object) -> QueryRequest:
    return QueryRequest(
        token_id="t1", model_id=MODEL, key_id=KEY_ID, blob_id=blob_id, input=pack_batch([(ITEM, i) for i in items]), **kw
    )  # type: ignore[arg-type]


def run_batch(
    w: World, req: QueryRequest | object, delivery: Delivery = OWN_QUEUE
) -> tuple[QueryReply, list[bytes | errors.CipherpoolError]]:
    raw = req.encode() if isinstance(req, QueryRequest) else req
    reply = QueryReply.decode(unwrap(handle_batch(w.ctx, w.runtime, raw, delivery)))  # type: ignore[arg-type]
    body = reply.output if reply.output is not None else w.ctx.store.get_payload(reply.output_ref)
    return reply, batch_items(body, 1000)


def test_a_batch_is_answered_item_by_item_with_one_key_lookup_and_bad_items_fail_alone(world):
    items = [
        envelope(),
        envelope(b"short"),  # malformed ciphertext
        envelope(),
        b"not an envelope",
        envelope(key_id="e" * 32),  # another key set
        envelope(model_id="o" * 16),  # another model
        envelope(value_ciphertext(data=b"x" * 10)),  # payload and shape disagree
        envelope(),
    ]
    reply, answers = run_batch(world, batch_request(world.blob_id, items))
    assert reply.batch == len(items) and reply.key_cache == "miss"
    kinds = [a.code if isinstance(a, errors.CipherpoolError) else "ok" for a in answers]
    assert kinds == [
        "ok",
        "malformed_ciphertext",
        "ok",
        "malformed_ciphertext",
        "key_mismatch",
        "model_mismatch",
        "invalid_ciphertext",
        "ok",
    ]
    for answer in (answers[0], answers[2], answers[7]):
        out = EncryptedOutput.decode(answer)  # type: ignore[arg-type]
        assert (out.model_id, out.key_id) == (MODEL, KEY_ID)
    assert world.evaluator.key_loads == 1 and world.evaluator.runs == 3
    report = world.runtime.report().model_dump()
    assert (report["queries_succeeded"], report["queries_refused"], report["key_cache_misses"], report["key_cache_hits"]) == (
        3,
        5,
        1,
        2,
    )
    assert world.hook.refusals == [
        "malformed_ciphertext",
        "malformed_ciphertext",
        "key_mismatch",
        "model_mismatch",
        "invalid_ciphertext",
    ]


def test_one_item_the_evaluator_fails_on_fails_alone(world):
    real = world.evaluator.run
    calls = []

    def flaky(data: bytes, keys: bytes) -> bytes:
        calls.append(data)
        if len(calls) == 2:
            raise RuntimeError("concrete crashed on this one")
        return real(data, keys)

    world.evaluator.run = flaky
    _, answers = run_batch(world, batch_request(world.blob_id, [envelope()] * 3))
    assert [isinstance(a, errors.RemoteError) for a in answers] == [False, True, False]
    assert world.runtime.report().model_dump()["queries_failed"] == 1


def test_a_large_batch_travels_by_reference_both_ways(world):
    world.ctx.settings.inline_max_bytes = 0
    body = pack_batch([(ITEM, envelope())] * 4)
    ref = world.ctx.store.put_payload(body, 60)
    req = QueryRequest(token_id="t1", model_id=MODEL, key_id=KEY_ID, blob_id=world.blob_id, input_ref=ref)
    reply, answers = run_batch(world, req)
    assert reply.output is None and reply.output_ref and len(answers) == 4
    assert all(isinstance(a, bytes) for a in answers)


def test_a_batch_that_is_no_batch_is_refused_whole(world):
    req = QueryRequest(token_id="t1", model_id=MODEL, key_id=KEY_ID, blob_id=world.blob_id, input=b"garbage")
    with pytest.raises(errors.MalformedCiphertext):
        unwrap(handle_batch(world.ctx, world.runtime, req.encode(), OWN_QUEUE))


def test_a_batch_for_a_model_not_served_here_goes_back_or_is_refused_whole(world):
    other = "someothermodel00"
    req = QueryRequest(
        token_id="t1",
        model_id=other,
        key_id=KEY_ID,
        blob_id=world.blob_id,
        input=pack_batch([(ITEM, envelope(model_id=other))] * 2),
    )
    with pytest.raises(Requeue):
        handle_batch(
            world.ctx, world.runtime, req.encode(), Delivery("b1", query_routing_key("cpu", other), "2030-01-01T00:00:00")
        )
    with pytest.raises(errors.ModelUnavailable):
        unwrap(handle_batch(world.ctx, world.runtime, req.encode(), Delivery("b2", POOL_QUEUE, None)))
    assert world.evaluator.runs == 0


def test_the_node_forgets_the_batch_in_flight_when_it_starts_it(world, monkeypatch):
    import cipherpool.workers.query as node_query

    forgotten: list[str] = []
    monkeypatch.setattr(node_query.inflight, "forget_quietly", lambda _client, query_id: forgotten.append(query_id))
    monkeypatch.setattr(type(world.ctx.settings), "broker_is_redis", lambda _self: True)
    world.ctx.__dict__["store"].redis = object()
    run_batch(world, batch_request(world.blob_id, [envelope()]), Delivery("batch-1", OWN_QUEUE.routing_key, OWN_QUEUE.expires))
    assert forgotten == ["batch-1"]
