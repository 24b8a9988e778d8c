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
    [b"", b"garbage", msgpack.packb({"format": "other"}), msgpack.packb([1, 2]),
     EncryptedOutput("m", "k", b"x").encode(),  # a result is not an input
     EncryptedInput("m", "k", b"x" * 100).encode()[:-10]],  # truncated
)
def test_malformed_envelopes_raise_a_typed_error(raw):
    with pytest.raises(MalformedCiphertext):
        EncryptedInput.decode(raw)


def test_request_and_reply_round_trip():
    req = QueryRequest(token="t", model_id="m", key_id="k", input=b"x", submitted_at=1.5)
    assert QueryRequest.decode(req.encode()) == req
    rep = QueryReply(output=b"y", node="n", key_cache="hit", timings={"compute_s": 1.0})
    assert QueryReply.decode(rep.encode()) == rep


@pytest.mark.parametrize("obj", [
    "not a dict", None, {}, {"token": "t", "model_id": "m", "key_id": "k"},  # neither input nor ref
    {"token": 1, "model_id": "m", "key_id": "k", "input": b"x"},
    {"token": "t", "model_id": "m", "key_id": "k", "input": "text, not bytes"},
    {"token": "t", "model_id": "m", "key_id": "k", "input": b"x", "input_ref": "r"},
])
def test_malformed_requests_are_refused_with_a_typed_error(obj):
    with pytest.raises(InvalidInput):
        QueryRequest.decode(obj)


def test_unknown_fields_are_ignored_so_newer_clients_reach_older_nodes():
    obj = {"token": "t", "model_id": "m", "key_id": "k", "input": b"x", "added_later": 1}
    assert QueryRequest.decode(obj).input == b"x"


def test_credentials_and_ciphertexts_never_reach_monitoring():
    shown = redacted_kwargs({"api_key": "cpk_secret", "token": "cpt_secret", "request": {"x": 1}, "name": "digits"})
    assert "secret" not in shown and "'x'" not in shown
    assert "digits" in shown
