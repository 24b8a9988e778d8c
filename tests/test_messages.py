import msgpack
import pytest

from cipherpool.errors import MalformedCiphertext
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


def test_credentials_and_ciphertexts_never_reach_monitoring():
    shown = redacted_kwargs({"api_key": "cpk_secret", "token": "cpt_secret", "request": {"x": 1}, "name": "digits"})
    assert "secret" not in shown and "'x'" not in shown
    assert "digits" in shown
