"""Issue 25 on a real stack (Redis, a control worker, a pool node, the gateway under uvicorn)
with a real concrete-ml model (the breast-cancer logistic regression):

* a well-framed ciphertext of zeros is a 422 ``invalid_ciphertext`` at the gateway (query and
  warm-up), and one that reaches the node past the gateway is refused there by type, never a
  502: the model's error rate stays 0 and the refusals are counted apart;
* a ciphertext our structural check lets through but concrete's own verifier refuses (its
  type information is not the circuit's) comes back as ``invalid_ciphertext`` too;
* warm-ups count against the token's quota (one per node that ran one; a cached key's is
  given back), and a spent quota gets the query's 429;
* a result names no node, and a provider's worker stats carry no node lifetime figures.

Everything runs on loopback; every process is started by the stack and stopped by its pid.
"""

from __future__ import annotations

import struct
import time
import uuid

import httpx
import pytest

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.messages import EncryptedInput, QueryRequest
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration

ZEROS = struct.pack("<II", 0, 4) + bytes(32)
QUOTA = 4


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer

    return train_breast_cancer(tmp_path_factory.mktemp("abuse-model") / "cancer")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("abuse-stack") / "platform", query_timeout_s=120.0)
    with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)) as s:
        yield s


@pytest.fixture(scope="module")
def served(stack, example, tmp_path_factory):
    mc = ManagementClient(stack.create_account("abuse"), settings=stack.client_settings)
    mc.deploy_model("cancer", example.path)
    mc.activate_model("cancer")
    mc.start_worker("cancer")
    token = mc.create_token("user", model="cancer", quota=QUOTA)
    qc = QueryClient(token, settings=stack.client_settings, key_dir=tmp_path_factory.mktemp("abuse-keys") / "k")
    qc.generate_keys()
    qc.upload_evaluation_keys()  # with its warm-up: one run on the one node
    yield mc, qc, token
    qc.close()
    mc.close()


def _http(stack: EmbeddedStack, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.gateway_url,
        timeout=60.0,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    )


def _used(mc: ManagementClient) -> int:
    [token] = [t for t in mc.list_tokens() if t.name == "user"]
    return token.queries_used


def _figures(mc: ManagementClient):
    [stats] = mc.model_stats("cancer")
    return stats.all_time


def test_unevaluable_ciphertexts_are_typed_refusals_apart_from_the_error_rate(stack, served, example):
    mc, qc, token = served
    assert qc.last_warmup is not None and qc.last_warmup.warmed == 1
    used = _used(mc)
    model_id, key_id = qc.model.id, qc.crypto.key_id()
    with _http(stack, token) as http:
        for path in ("/v1/queries", f"/v1/client/keys/{key_id}/warmup"):
            answer = http.post(path, content=EncryptedInput(model_id, key_id, ZEROS).encode())
            assert (answer.status_code, answer.json()["code"]) == (422, "invalid_ciphertext"), answer.text
    assert _used(mc) == used, "a refused ciphertext is not counted"

    # Past the gateway (trusted code publishing itself): the node refuses it by type, first thing.
    from cipherpool.dispatch import publish_query, reply_from_meta

    request = QueryRequest(
        token_id="t",
        model_id=model_id,
        key_id=key_id,
        blob_id="0" * 64,
        version=1,
        input=EncryptedInput(model_id, key_id, ZEROS).encode(),
        submitted_at=time.time(),
    )
    from cipherpool.config.celery import create_app

    app = create_app(stack.settings.model_copy(update={"broker_url": stack.broker_url}), name="abuse-test")
    try:
        handle = publish_query(app, request, "cpu", 60.0, task_id=str(uuid.uuid4()), model_name="cancer")
        handle.get(timeout=60, propagate=False)
        with pytest.raises(errors.InvalidCiphertext):
            reply_from_meta({"status": handle.state, "result": handle.result})
    finally:
        app.close()

    # Well formed for our check, refused by concrete's verifier: its type information is not the
    # circuit's (the LWE ciphertexts' integer precision, 64, made 96).
    real = bytearray(EncryptedInput.decode(qc.encrypt(example.x_test[0])).data)
    from cipherpool.fhe.values import _Message, _Struct, check_ciphertext

    message = _Message(bytes(real))
    lwe = _Struct(message, message.resolve(0, 0)).child(2).child(0)
    at = message.segments[lwe.segment][0] + 8 * lwe.start
    assert struct.unpack_from("<I", real, at)[0] == 64
    struct.pack_into("<I", real, at, 96)
    check_ciphertext(bytes(real))  # passes the gateway's and the node's own check
    with pytest.raises(errors.InvalidCiphertext, match="incompatible type info"):
        qc.execute(EncryptedInput(model_id, key_id, bytes(real)).encode())

    deadline = time.monotonic() + 10  # the node's timings hook writes every half second
    while (figures := _figures(mc)).refused < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert figures.refused >= 4 and figures.failed == 0, figures
    assert figures.error_rate in (None, 0.0), figures
    assert qc.decrypt(qc.execute(qc.encrypt(example.x_test[0]))) is not None  # the node keeps serving


def test_warmups_count_against_the_quota_and_results_name_no_node(stack, served, example):
    mc, qc, token = served
    key_id = qc.crypto.key_id()
    envelope = qc.encrypt(example.x_test[0])
    used = _used(mc)
    with _http(stack, token) as http:
        again = http.post(f"/v1/client/keys/{key_id}/warmup", content=envelope)  # the key is warm: given back
        assert again.status_code == 200 and again.json()["warmed"] == 1, again.text
        assert _used(mc) == used
        while _used(mc) < QUOTA:
            answer = http.post("/v1/queries", params={"wait": 30}, content=envelope)
            assert answer.status_code == 200, answer.text
            assert "x-cipherpool-node" not in answer.headers
            assert not any("@" in value for value in answer.headers.values()), dict(answer.headers)
        warm = http.post(f"/v1/client/keys/{key_id}/warmup", content=envelope)
        query = http.post("/v1/queries", content=envelope)
    assert (warm.status_code, warm.json()["code"]) == (429, "token_quota_exceeded"), warm.text
    assert (query.status_code, query.json()["code"]) == (429, "token_quota_exceeded"), query.text
    [stats] = mc.worker_stats("cancer")
    assert stats.node_lifetime is None and stats.queries_succeeded >= 1
    assert not hasattr(qc, "last_node")
