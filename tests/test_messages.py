import msgpack
import pytest

from cipherpool.errors import InvalidInput, MalformedCiphertext
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest, redacted_kwargs


def test_envelopes_round_trip_and_keep_bytes_binary():
    env = EncryptedInput("m1", "k1", b"\x00\x01ciphertext")
    raw = env.encode()
    assert EncryptedInput.decode(raw) == env
    assert b"\x00\x01ciphertext" in raw  # not base64


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        msgpack.packb({"format": "other"}),
        msgpack.packb([1, 2]),
        EncryptedOutput("m", "k", b"x").encode(),  # a result is not an input
        EncryptedInput("m", "k", b"x" * 100).encode()[:-10],
    ],  # truncated
)
def test_malformed_envelopes_raise_a_typed_error(raw):
    with pytest.raises(MalformedCiphertext):
        EncryptedInput.decode(raw)


def test_request_and_reply_round_trip():
    req = QueryRequest(token_id="t", model_id="m", key_id="k", blob_id="b", input=b"x", submitted_at=1.5)
    assert QueryRequest.decode(req.encode()) == req
    rep = QueryReply(output=b"y", node="n", key_cache="hit", timings={"compute_s": 1.0})
    assert QueryReply.decode(rep.encode()) == rep


IDS = {"token_id": "t", "model_id": "m", "key_id": "k", "blob_id": "b"}


@pytest.mark.parametrize(
    "obj",
    [
        "not a dict",
        None,
        {},
        [1, 2],
        IDS,  # neither input nor ref
        {**IDS, "token_id": 1, "input": b"x"},
        {**IDS, "input": "text, not bytes"},
        {**IDS, "input": b"x", "input_ref": "r"},
        {**IDS, "input": b"x", "submitted_at": "yesterday"},
        {"token": "cpt_value", "model_id": "m", "key_id": "k", "input": b"x"},  # a credential, not an id
    ],
)
def test_malformed_requests_are_refused_with_a_typed_error(obj):
    with pytest.raises(InvalidInput):
        QueryRequest.decode(obj)


def test_unknown_fields_are_ignored_so_newer_clients_reach_older_nodes():
    obj = {**IDS, "input": b"x", "added_later": 1}
    assert QueryRequest.decode(obj).input == b"x"


@pytest.mark.parametrize("data", [2**30, 56, -1, None, "text", [1], {"a": 1}])
def test_an_envelope_whose_data_is_not_bytes_is_refused_without_allocating(data):
    # bytes(2**30) would allocate 1 GiB: a 30-byte message must not be able to do that.
    raw = msgpack.packb({"format": EncryptedInput.FORMAT, "model": "m", "key": "k", "data": data})
    with pytest.raises(MalformedCiphertext):
        EncryptedInput.decode(raw)


def test_credentials_and_ciphertexts_never_reach_monitoring():
    shown = redacted_kwargs({"api_key": "cpk_secret", "token": "cpt_secret", "request": {"x": 1}, "name": "digits"})
    assert "secret" not in shown and "'x'" not in shown
    assert "digits" in shown
