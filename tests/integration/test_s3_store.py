"""The S3 blob store end to end: a whole stack (its own Redis, two pool nodes, the gateway) whose
blobs live in a bucket of moto's S3 server, started here on a free loopback port and stopped by
its pid. Deploy, key upload, queries, a rebind served from the node's disk cache, a rollout, and
delete; the broker's Redis never holds a blob, and its memory does not grow with a 35 MB key."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.blobs import node_cache_dir, read_figures
from cipherpool.blobs.migrate import check, referenced
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.stack.supervisor import Supervisor
from cipherpool.store import BlobKind, BlobStore, redis_client, sha256_hex
from tests.s3server import start_moto

pytestmark = pytest.mark.integration
MIB = 1024**2


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3-stack")
    supervisor = Supervisor(tmp / "moto")
    try:
        moto = start_moto(supervisor, tmp / "moto")
        settings = Settings(
            data_dir=tmp / "platform",
            query_timeout_s=120,
            version_grace_s=2.0,
            **moto.settings(node_blob_cache_bytes=2 * 1024**3),
        )
        with EmbeddedStack(settings, StackOptions(nodes=2, node_concurrency=1, beat=False, flower=False)) as stack:
            mc = ManagementClient(stack.create_account("p"), settings=stack.client_settings)
            yield stack, moto, mc
            mc.close()
    finally:
        supervisor.stop_all(grace_s=5)


def _objects(moto) -> dict[str, int]:
    pages = moto.client().get_paginator("list_objects_v2").paginate(Bucket=moto.bucket)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def _blob_keys(redis) -> list[bytes]:
    return list(redis.scan_iter(match="cipherpool:blob:*")) + list(redis.scan_iter(match="cipherpool:upload:*"))


def _cache(stack, mc, model) -> SimpleNamespace:
    """The disk-cache figures of the node serving the model, as the node saved them on this host."""
    [stats] = mc.worker_stats(model)
    figures = read_figures(node_cache_dir(stack.platform_settings, stats.node))
    assert figures is not None
    return SimpleNamespace(**figures)


def _train_v2(path):
    from concrete.ml.deployment import FHEModelDev
    from concrete.ml.sklearn import LogisticRegression
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    model = LogisticRegression(n_bits=6)
    model.fit(x[:400], y[:400])
    model.compile(x[:400])
    path.mkdir(parents=True)
    FHEModelDev(str(path), model).save()
    return lambda xs: model.predict_proba(xs, fhe="disable")


def test_deploy_keys_queries_rebind_rollout_and_delete_on_s3(s3_stack, examples, tmp_path):
    stack, moto, mc = s3_stack
    assert stack.platform_settings.effective_blob_store() == "s3"
    broker = redis_client(stack.broker_url)
    digits, cancer = examples["digits"], examples["cancer"]

    # Deploy: both zips of both models go to the bucket, none to Redis.
    for name, example in (("digits", digits), ("cancer", cancer)):
        mc.deploy_model(name, example.path)
        mc.activate_model(name)
        mc.start_worker(name)
    objects = _objects(moto)
    assert sum(key.startswith("blob/server/") for key in objects) == 2
    assert sum(key.startswith("blob/client/") for key in objects) == 2
    assert _blob_keys(broker) == []

    # Key upload (35 MB, streamed through the gateway) and queries: the broker's memory stays flat.
    before = int(broker.info("memory")["used_memory"])
    qc = QueryClient(
        mc.create_token("u", model="digits"),
        settings=stack.client_settings.model_copy(update={"query_timeout_s": 120}),
        key_dir=tmp_path / "digits-keys",
    )
    qc.generate_keys()
    qc.upload_evaluation_keys()
    key = qc.crypto.evaluation_key()
    assert len(key) > 10 * MIB
    assert _objects(moto)[f"blob/evk/{sha256_hex(key)}"] == len(key)
    for i in range(2):
        out = qc.decrypt(qc.execute(qc.encrypt(digits.x_test[i])))
        assert int(np.argmax(out)) == int(np.argmax(digits.clear(digits.x_test[i : i + 1])[0]))
    assert int(broker.info("memory")["used_memory"]) - before < 8 * MIB
    assert _blob_keys(broker) == []
    first = _cache(stack, mc, "digits")
    assert first.misses >= 2 and first.fetched_bytes >= len(key)  # server.zip at bind, the key at warm-up

    # Rebind on the same node: the server zip and the key come from the node's disk, not the bucket.
    [worker] = [w for w in mc.list_workers("digits") if w.status.value == "up"]
    mc.stop_worker(worker.id)
    mc.start_worker("digits")
    qc.execute(qc.encrypt(digits.x_test[2]))
    again = _cache(stack, mc, "digits")
    assert again.hits >= first.hits + 2 and again.misses == first.misses
    assert again.served_bytes - first.served_bytes >= len(key)

    # A rollout: version 2's server zip goes to the bucket, nodes load it, old keys are refused.
    cq = QueryClient(mc.create_token("c", model="cancer"), settings=stack.client_settings, key_dir=tmp_path / "cancer-keys")
    cq.generate_keys()
    cq.upload_evaluation_keys()
    ciphertext = cq.encrypt(cancer.x_test[0])
    np.testing.assert_allclose(cq.decrypt(cq.execute(ciphertext)), cancer.clear(cancer.x_test[:1]), atol=1e-6)
    clear_v2 = _train_v2(tmp_path / "v2")
    mc.deploy_version("cancer", tmp_path / "v2")
    assert mc.wait_for_rollout("cancer", timeout=120).version == 2
    assert sum(key.startswith("blob/server/") for key in _objects(moto)) == 3
    with pytest.raises(errors.KeysOutdated):
        cq.execute(ciphertext)
    fresh = QueryClient(
        mc.create_token("c2", model="cancer"), settings=stack.client_settings, key_dir=tmp_path / "cancer-v2-keys"
    )
    fresh.generate_keys()
    fresh.upload_evaluation_keys()
    np.testing.assert_allclose(
        fresh.decrypt(fresh.execute(fresh.encrypt(cancer.x_test[1]))), clear_v2(cancer.x_test[1:2]), atol=1e-6
    )

    # Delete: nothing the database still references goes missing, and Redis held no blob throughout.
    for w in mc.list_workers("digits"):
        if w.status.value == "up":
            mc.stop_worker(w.id)
    mc.delete_model("digits")
    store = BlobStore.from_settings(stack.platform_settings)
    with session_scope(stack.platform_settings.effective_database_url()) as session:
        report = check(referenced(session), store)
    assert report.ok, report.missing
    assert (BlobKind.EVALUATION_KEY, sha256_hex(key)) not in referenced_now(stack)
    assert _blob_keys(broker) == []
    for client in (qc, cq, fresh):
        client.close()
    broker.close()


def referenced_now(stack: EmbeddedStack) -> set[tuple[BlobKind, str]]:
    with session_scope(stack.platform_settings.effective_database_url()) as session:
        return set(referenced(session))
