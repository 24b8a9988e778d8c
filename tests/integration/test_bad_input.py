"""Every bad input gets a typed error on the client, and a valid query still succeeds after."""

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.messages import EncryptedInput
from cipherpool.store import BlobKind, BlobStore, sha256_hex

pytestmark = pytest.mark.integration


@pytest.fixture
def still_serving(clients, examples):
    """After the test body, each model answers a valid query correctly."""
    yield
    for name in ("digits", "cancer"):
        x = examples[name].x_test[:1]
        np.testing.assert_allclose(clients[name].predict(x[0]), examples[name].clear(x), atol=1e-3)


def test_unknown_model(platform, still_serving):
    for call in (
        lambda: platform.mc.activate_model("nope"),
        lambda: platform.mc.start_worker("nope"),
        lambda: platform.mc.create_token("t", model="nope"),
    ):
        with pytest.raises(errors.ModelNotFound):
            call()


def test_unknown_token_is_refused_by_the_gateway(platform, clients, examples, tmp_path, still_serving):
    with pytest.raises(errors.InvalidToken):
        _ = platform.query_client("cancer", tmp_path, token="cpt_not-a-real-token").model
    qc = clients["cancer"]
    ciphertext = qc.encrypt(examples["cancer"].x_test[0])
    real, qc.token = qc.token, "cpt_forged"
    try:
        with pytest.raises(errors.InvalidToken):
            qc.execute(ciphertext)
    finally:
        qc.token = real


def test_token_not_assigned_to_the_model(clients, examples, still_serving):
    # A valid cancer token whose query is sent to the digits model's queue.
    digits, cancer = clients["digits"], clients["cancer"]
    ciphertext = digits.encrypt(examples["digits"].x_test[0])
    real, digits.token = digits.token, cancer.token
    try:
        with pytest.raises(errors.TokenNotForModel):
            digits.execute(ciphertext)
    finally:
        digits.token = real


def test_revoked_token(platform, examples, tmp_path, still_serving):
    value = platform.mc.create_token("short-lived", model="cancer")
    qc = platform.query_client("cancer", tmp_path, token=value)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    ciphertext = qc.encrypt(examples["cancer"].x_test[0])
    assert qc.execute(ciphertext)
    token_id = next(t.id for t in platform.mc.list_tokens() if t.name == "short-lived")
    platform.mc.revoke_token(token_id)
    with pytest.raises(errors.InvalidToken, match="revoked"):
        qc.execute(ciphertext)
    qc.close()


def test_inactive_model(platform, clients, examples, still_serving):
    qc = clients["cancer"]
    ciphertext = qc.encrypt(examples["cancer"].x_test[0])
    platform.mc.deactivate_model("cancer")
    try:
        with pytest.raises(errors.ModelInactive):
            qc.execute(ciphertext)
    finally:
        platform.mc.activate_model("cancer")


def test_evaluation_key_never_uploaded(platform, examples, tmp_path, still_serving):
    qc = platform.query_client("cancer", tmp_path)
    qc.generate_keys()  # but no upload
    ciphertext = qc.encrypt(examples["cancer"].x_test[0])
    # The gateway refuses a query under a key set it does not hold, with the typed error ...
    with pytest.raises(errors.EvaluationKeyNotFound):
        qc._t.request("POST", "/v1/queries", content=ciphertext, headers={"Content-Type": "application/octet-stream"})
    # ... on which the client uploads its key set by itself and sends the query again, once
    assert qc.decrypt(qc.execute(ciphertext)) is not None
    assert len(qc.key_actions) == 1 and "was not uploaded yet: uploaded it and retried the query" in qc.key_actions[0]
    qc.close()


def test_truncated_evaluation_key_is_refused_at_upload(platform, clients, still_serving):
    qc = clients["digits"]
    truncated = qc.crypto.evaluation_key()[:100_000]
    with pytest.raises(errors.InvalidEvaluationKey):
        qc._t.request(
            "PUT", "/v1/client/keys/" + "f" * 32, content=truncated, headers={"Content-Type": "application/octet-stream"}
        )
    store = BlobStore.from_settings(platform.stack.platform_settings)
    assert not store.exists(BlobKind.EVALUATION_KEY, sha256_hex(truncated))
    assert not list((platform.stack.platform_settings.effective_blob_dir() / "upload").iterdir())


@pytest.mark.parametrize(
    "mangle",
    [
        lambda ct, qc: b"definitely not a ciphertext",
        lambda ct, qc: ct[: len(ct) // 2],
    ],
)
def test_malformed_ciphertext_is_refused_on_the_client(clients, examples, mangle, still_serving):
    qc = clients["cancer"]
    with pytest.raises(errors.MalformedCiphertext):
        qc.execute(mangle(qc.encrypt(examples["cancer"].x_test[0]), qc))


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_corrupt_ciphertext_inside_a_valid_envelope_is_refused_by_the_worker(clients, examples, cut, still_serving):
    qc = clients["digits"]
    env = EncryptedInput.decode(qc.encrypt(examples["digits"].x_test[0]))
    forged = EncryptedInput(env.model_id, env.key_id, env.data[: int(len(env.data) * cut)]).encode()
    with pytest.raises(errors.MalformedCiphertext):
        qc.execute(forged)
    garbage = EncryptedInput(env.model_id, env.key_id, b"\0" * 64).encode()
    with pytest.raises(errors.MalformedCiphertext):
        qc.execute(garbage)


def test_ciphertext_made_with_another_clients_keys(platform, clients, examples, tmp_path, still_serving):
    other = platform.query_client("cancer", tmp_path)
    other.generate_keys()
    other.upload_evaluation_keys()
    theirs = other.encrypt(examples["cancer"].x_test[0])
    with pytest.raises(errors.KeyMismatch):
        clients["cancer"].execute(theirs)
    # and a result computed for one client cannot be decrypted by another
    with pytest.raises(errors.KeyMismatch):
        clients["cancer"].decrypt(other.execute(theirs))
    other.close()


def test_ciphertext_made_for_another_model(clients, examples, still_serving):
    digits, cancer = clients["digits"], clients["cancer"]
    cancer_ct = cancer.encrypt(examples["cancer"].x_test[0])
    with pytest.raises(errors.ModelMismatch):
        digits.execute(cancer_ct)
    # Even with the envelope relabelled, concrete's shape check is turned into a typed error.
    env = EncryptedInput.decode(cancer_ct)
    relabelled = EncryptedInput(digits.model.id, digits.crypto.key_id(), env.data).encode()
    with pytest.raises(errors.ModelMismatch):
        digits.execute(relabelled)


@pytest.mark.parametrize("shape", [(5,), (2, 30), (1, 31), (0,)])
def test_wrong_input_shape_to_encrypt(clients, shape, still_serving):
    with pytest.raises(errors.InvalidShape):
        clients["cancer"].encrypt(np.zeros(shape))


def test_a_directory_that_is_not_a_deployment(platform, tmp_path, still_serving):
    (tmp_path / "client.zip").write_bytes(b"not a zip")
    (tmp_path / "server.zip").write_bytes(b"not a zip")
    with pytest.raises(errors.InvalidDeployment):
        platform.mc.deploy_model("broken", tmp_path)
    with pytest.raises(errors.InvalidDeployment):
        platform.mc.deploy_model("broken", tmp_path / "nowhere")


def test_tenants_are_isolated(platform, still_serving):
    other = platform.account("another-provider")
    assert other.list_models() == [] and other.list_tokens() == [] and other.list_workers() == []
    with pytest.raises(errors.WorkerNotFound):
        other.stop_worker(platform.workers["digits"])
    with pytest.raises(errors.ModelNotFound):
        other.create_token("steal", model="digits")
    with pytest.raises(errors.InvalidApiKey):
        type(other)("cpk_forged", settings=platform.settings).list_models()
    # A token is not an API key, and an API key is not a token.
    with pytest.raises(errors.WrongCredential):
        type(other)(platform.tokens["digits"], settings=platform.settings).list_models()
    with pytest.raises(errors.WrongCredential):
        _ = platform.query_client("digits", None, token=platform.api_key).model
    other.close()
