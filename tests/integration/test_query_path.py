"""End to end over real Redis and real `celery worker` pool nodes with real FHE models."""

import json
import os

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.messages import EncryptedInput
from cipherpool.store import BlobKind, BlobStore, sha256_hex
from cipherpool.waiting import wait_until
from tests.integration.helpers import node_of
from tests.integration.recording_hook import EVENTS_FILE

pytestmark = pytest.mark.integration


def assert_matches_clear(qc, example, rows):
    x = example.x_test[rows]
    decrypted = qc.predict(x)
    clear = example.clear(x)
    np.testing.assert_allclose(decrypted, clear, atol=1e-3)
    assert (decrypted.argmax(axis=1) == clear.argmax(axis=1)).all()


def test_digits_network_decrypts_to_the_clear_prediction(clients, examples):
    # Three images as concurrent queries on a node running two at a time.
    assert_matches_clear(clients["digits"], examples["digits"], slice(0, 3))


def test_logistic_regression_decrypts_to_the_clear_prediction(clients, examples):
    assert_matches_clear(clients["cancer"], examples["cancer"], slice(0, 6))


def test_a_batch_is_answered_item_by_item_and_a_corrupted_item_fails_alone(platform, clients, examples, monkeypatch):
    # Given 20 rows of the breast-cancer logistic regression, one of them corrupted in transit
    qc, example = clients["cancer"], examples["cancer"]
    x = example.x_test[:20]
    ciphertexts = [qc.encrypt(row) for row in x]
    bad = EncryptedInput.decode(ciphertexts[7])
    ciphertexts[7] = EncryptedInput(bad.model_id, bad.key_id, bad.data[:-8]).encode()
    before = platform.mc.worker_stats("cancer")[0]
    # When they go as one batch (one task, one node)
    items = qc.execute_many(ciphertexts, timeout=60)
    # Then 19 answers decrypt to the clear model's, and the corrupted one is a typed error alone
    clear = example.clear(x)
    assert len(items) == 20 and isinstance(items[7], errors.MalformedCiphertext), items[7]
    for i, item in enumerate(items):
        if i != 7:
            assert isinstance(item, bytes), item
            np.testing.assert_allclose(qc.decrypt(item), clear[i : i + 1], atol=1e-3)
    after = platform.mc.worker_stats("cancer")[0]
    assert (after.queries_succeeded - before.queries_succeeded, after.queries_refused - before.queries_refused) == (19, 1)
    # and predict_many sends many rows as batches (here of 8), decrypted in order
    monkeypatch.setattr(qc.settings, "batch_size", 8)
    np.testing.assert_allclose(qc.predict_many(x), clear, atol=1e-3)


def test_step_by_step_api_reports_timings(platform, clients, examples):
    qc = clients["cancer"]
    ciphertext = qc.encrypt(examples["cancer"].x_test[0])
    handle = qc.submit(ciphertext)
    output = handle.result(timeout=60)
    np.testing.assert_allclose(qc.decrypt(output), examples["cancer"].clear(examples["cancer"].x_test[:1]), atol=1e-3)
    assert {"queue_wait_s", "open_s", "key_s", "compute_s", "end_to_end_s"} <= set(handle.timings)
    assert node_of(platform.stack, handle).startswith("node") and handle.status() == "done"
    assert handle.result() is output  # idempotent: no second round trip


def test_a_querys_calls_go_on_the_lean_lane(clients, examples, monkeypatch):
    """A query's submit, its execute and its polls travel on the client's lean HTTP lane
    (cipherpool/client/lean.py) through the real gateway, with the answers httpx would get."""
    from cipherpool.client.lean import LeanLane

    sent: list[tuple[str, str, int]] = []
    real = LeanLane.request

    def counted(self, method, path, **kw):  # type: ignore[no-untyped-def]
        response = real(self, method, path, **kw)
        sent.append((method, path, response.status_code))
        return response

    monkeypatch.setattr(LeanLane, "request", counted)
    qc, example = clients["cancer"], examples["cancer"]
    x = example.x_test[:2]
    np.testing.assert_allclose(qc.decrypt(qc.execute(qc.encrypt(x[:1]))), example.clear(x[:1]), atol=1e-3)
    handle = qc.submit(qc.encrypt(x[1:2]))
    np.testing.assert_allclose(qc.decrypt(handle.result(timeout=60)), example.clear(x[1:2]), atol=1e-3)
    assert sent[0] == ("POST", "/v1/queries", 200)  # answered within the wait: one request
    assert sent[1] == ("POST", "/v1/queries", 202)
    assert sent[-1][0] == "GET" and sent[-1][1] == f"/v1/queries/{handle.id}" and sent[-1][2] == 200


def test_a_nodes_bookkeeping_is_written_after_the_answer(platform, clients, examples):
    """The query's in-flight record is forgotten, and the query counted for usage reports, by
    a real node once its answer is stored (cipherpool/workers/afteranswer.py)."""
    import redis

    from cipherpool import inflight
    from cipherpool.names import INFLIGHT_INDEX_KEY, QUERY_COUNT_PREFIX

    r = redis.Redis.from_url(platform.stack.broker_url)

    worker = platform.workers["cancer"]

    def counted() -> int:  # this worker's queries (fields "<model>:<worker>"), whoever counted them
        return sum(
            int(n)
            for key in r.scan_iter(QUERY_COUNT_PREFIX + "*")
            for field, n in r.hgetall(key).items()
            if field.decode().endswith(":" + worker)
        )

    before = counted()
    qc = clients["cancer"]
    handle = qc.submit(qc.encrypt(examples["cancer"].x_test[0]))
    handle.result(timeout=60)
    assert wait_until(lambda: counted() == before + 1 or None, 10), "the query was counted once"
    assert inflight.load(r, [handle.id])[handle.id] is None and r.zscore(INFLIGHT_INDEX_KEY, handle.id) is None


def test_two_queries_in_a_row_reuse_the_cached_evaluation_key(platform, examples, tmp_path):
    # Given a client with a brand-new key, not warmed on the node
    qc = platform.query_client("digits", tmp_path / "k")
    qc.generate_keys()
    qc.upload_evaluation_keys(warm_up=False)
    before = platform.mc.worker_stats("digits")[0]
    [recorded] = [w for w in platform.mc.model_stats("digits")[0].workers if w.worker_id == before.worker_id]
    # When it sends two queries
    replies = []
    for i in range(2):
        handle = qc.submit(qc.encrypt(examples["digits"].x_test[i]))
        handle.result()
        replies.append(handle.key_cache)
    after = platform.mc.worker_stats("digits")[0]
    # Then the key was deserialized once and served from the cache the second time
    assert replies == ["miss", "hit"]
    assert (after.key_cache_misses - before.key_cache_misses, after.key_cache_hits - before.key_cache_hits) == (1, 1)
    # and the model itself was loaded once, when the node was bound, not per query
    assert after.worker_id == before.worker_id and after.model_loads == 1
    assert after.queries_succeeded - before.queries_succeeded == 2

    # and the recorded figures (worker stats, /metrics, Flower) count that miss and that hit, the
    # key's load time and the bytes resident in the node's cache
    def counted():
        [row] = [w for w in platform.mc.model_stats("digits")[0].workers if w.worker_id == before.worker_id]
        return row if row.all_time.key_cache_hits > recorded.all_time.key_cache_hits else None

    row = wait_until(counted, 10)
    assert row.all_time.key_cache_misses - recorded.all_time.key_cache_misses == 1
    assert row.all_time.key_cache_hits - recorded.all_time.key_cache_hits == 1
    assert row.all_time.average_key_load_s > 0 and row.key_bytes == after.key_cache.charged_bytes > 0
    qc.close()


def test_recorded_query_times_agree_with_what_the_client_saw(platform, examples, tmp_path):
    # Given a model whose node records every query's times (cipherpool.monitoring.timings)
    qc = platform.query_client("digits", tmp_path / "k")
    qc.generate_keys()
    qc.upload_evaluation_keys()
    [before] = platform.mc.model_stats("digits")
    # When a query runs
    handle = qc.submit(qc.encrypt(examples["digits"].x_test[0]))
    handle.result()
    qc.close()
    # Then the model's figures count it (the node writes them within half a second), with
    # the node's own queue wait and compute
    wait_until(lambda: platform.mc.model_stats("digits")[0].all_time.queries > before.all_time.queries, 10)
    [after] = platform.mc.model_stats("digits", last=1)
    assert after.all_time.queries == before.all_time.queries + 1
    assert after.current.average_compute_s == pytest.approx(handle.timings["compute_s"], abs=1e-3)
    assert after.current.average_queue_wait_s == pytest.approx(handle.timings["queue_wait_s"], abs=1e-3)
    assert after.window.queries >= 1 and after.window.queries_per_minute > 0
    [row] = [r for r in after.workers if r.worker_id == platform.workers["digits"]]
    assert row.status == "up" and row.current.latest_query_s == pytest.approx(after.current.latest_query_s)
    assert after.workers_by_status == {"up": 1} and after.queue_depth == 0
    # and the node's live report carries the same recorded figures for its worker
    [live] = platform.mc.worker_stats("digits")
    assert live.window is not None and live.window.queries == row.window.queries and live.queue_depth == 0


def test_a_warmed_key_makes_the_first_query_a_cache_hit(platform, examples, tmp_path):
    # Given a client whose key upload warms the key on the node serving the model
    qc = platform.query_client("digits", tmp_path / "k")
    qc.generate_keys()
    key_id = qc.upload_evaluation_keys()
    assert (qc.last_warmup.nodes, qc.last_warmup.warmed) == (1, 1)
    # Then its first query finds the key deserialized (and the warm-up counted as no query)
    handle = qc.submit(qc.encrypt(examples["digits"].x_test[0]))
    assert int(np.argmax(qc.decrypt(handle.result()))) == int(
        np.argmax(examples["digits"].clear(examples["digits"].x_test[:1])[0])
    )
    assert handle.key_cache == "hit"
    worker = platform.workers["digits"]
    assert any(f"key set {key_id[:12]}" in line.message and "warmed" in line.message for line in platform.mc.worker_logs(worker))
    qc.close()


def test_ciphertexts_above_the_inline_limit_travel_by_reference(platform, examples, tmp_path):
    qc = platform.query_client("cancer", tmp_path / "k", inline_max_bytes=0)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    assert_matches_clear(qc, examples["cancer"], slice(0, 1))
    qc.close()


def test_evaluation_keys_are_content_addressed_and_uploaded_once(platform, clients, examples):
    qc = clients["digits"]  # keys generated and uploaded by the fixture
    blob_id = sha256_hex(qc.crypto.evaluation_key())
    store = BlobStore.from_settings(platform.stack.platform_settings)  # the test looks behind the gateway
    assert store.kind == "fs"  # the embedded stack's store: files under the data directory
    assert store.exists(BlobKind.EVALUATION_KEY, blob_id)
    key_size = store.size(BlobKind.EVALUATION_KEY, blob_id)
    assert key_size > 10_000_000  # bootstrapping key
    assert not list(store.redis.scan_iter("cipherpool:blob:*"))  # no blob in the broker's Redis
    evk_keys = set(store.blobs(BlobKind.EVALUATION_KEY))
    sent: list[tuple[str, str, int]] = []
    qc._t._http.event_hooks["request"].append(lambda r: sent.append((r.method, r.url.path, len(r.content))))
    try:
        # Uploading the same key set again stores nothing new: one blob per content.
        assert qc.upload_evaluation_keys() == qc.crypto.key_id()
        assert set(store.blobs(BlobKind.EVALUATION_KEY)) == evk_keys
        # Queries never carry the key again: they name it, and their bodies are ciphertexts only.
        for i in range(2):
            qc.execute(qc.encrypt(examples["digits"].x_test[i]))
    finally:
        qc._t._http.event_hooks["request"].pop()
    uploads = [size for method, path, size in sent if method == "PUT"]
    queries = [size for method, path, size in sent if path == "/v1/queries"]
    assert uploads == [key_size] and len(queries) == 2
    assert max(queries) < key_size / 100
    assert not list((platform.stack.platform_settings.effective_blob_dir() / "upload").iterdir())  # nothing half-uploaded


def test_worker_stop_and_start(platform, examples, clients):
    mc = platform.mc
    stopped = mc.stop_worker(platform.workers["cancer"])
    assert stopped.status.value == "stopped"
    assert all(w.status.value != "up" for w in mc.list_workers("cancer"))
    # With no worker, a query is withdrawn after its timeout with the reason.
    qc = clients["cancer"]
    with pytest.raises(errors.ModelUnavailable, match="worker start"):
        qc.execute(qc.encrypt(examples["cancer"].x_test[0]), timeout=2)
    started = mc.start_worker("cancer")
    platform.workers["cancer"] = started.id
    assert started.status.value == "up"
    assert_matches_clear(clients["cancer"], examples["cancer"], slice(0, 1))


def test_a_long_query_is_waited_for_by_polling_not_by_one_long_request(platform, clients, examples):
    # With a long-poll bound below the query's run time, execute() polls until the answer.
    qc = platform.query_client("digits", clients["digits"].key_dir, long_poll_s=0.2)
    qc._crypto = clients["digits"].crypto
    x = examples["digits"].x_test[:1]
    np.testing.assert_allclose(qc.decrypt(qc.execute(qc.encrypt(x[0]))), examples["digits"].clear(x), atol=1e-3)
    qc.close()


def test_trusted_in_cluster_code_submits_through_celery(platform, clients, examples):
    """The Python task submission API: platform credentials, token by id, no gateway."""
    from cipherpool.config.settings import reset_settings
    from cipherpool.context import PlatformContext

    qc = clients["cancer"]
    token_id = next(t.id for t in platform.mc.list_tokens() if t.name == "cancer-user")
    env = {k: v for k, v in platform.stack.env.items() if k.startswith("CIPHERPOOL_")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_settings()
    try:
        from cipherpool.config.settings import get_settings
        from cipherpool.tasks.submit import batch_outputs, query_output, submit_batch, submit_query

        ctx = PlatformContext(get_settings())
        x = examples["cancer"].x_test[:1]
        # The first query's message is Celery's build (the proof); the second is the platform's
        # own (cipherpool.publishwrites.QueryPublish): a real node answers both.
        for _ in range(2):
            handle = submit_query(token_id, qc.encrypt(x[0]), ctx=ctx)
            output = query_output(handle, timeout=60, ctx=ctx)
            np.testing.assert_allclose(qc.decrypt(output), examples["cancer"].clear(x), atol=1e-3)
        from cipherpool.publishwrites import query_publish
        from cipherpool.tasks.app import app

        proved = query_publish(app).proved()
        assert proved and all(proved.values())  # the second was built here, having passed its proof

        # A batch, one item of it corrupted: that one fails alone, in its place.
        rows = examples["cancer"].x_test[:3]
        ciphertexts = [qc.encrypt(row) for row in rows]
        envelope = EncryptedInput.decode(ciphertexts[1])
        ciphertexts[1] = EncryptedInput(envelope.model_id, envelope.key_id, b"\x00" * 64).encode()
        items = batch_outputs(submit_batch(token_id, ciphertexts, ctx=ctx), timeout=60, ctx=ctx)
        assert isinstance(items[1], errors.InvalidInput)
        for i in (0, 2):
            assert isinstance(items[i], bytes)
            np.testing.assert_allclose(qc.decrypt(items[i]), examples["cancer"].clear(rows[i : i + 1]), atol=1e-3)
        with pytest.raises(errors.InvalidToken):
            submit_query("0" * 16, qc.encrypt(x[0]), ctx=ctx)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()


def test_a_hook_named_in_the_settings_hears_real_queries_and_refusals(platform, clients, examples):
    # The session's stack runs every node with CIPHERPOOL_NODE_HOOKS naming a recording hook.
    qc = clients["cancer"]
    env = EncryptedInput.decode(qc.encrypt(examples["cancer"].x_test[0]))
    good = qc.submit(qc.encrypt(examples["cancer"].x_test[1]))
    good.result()
    # A well-formed ciphertext of another model under this model's ids: it passes the gateway's
    # structure check (a malformed one is refused there, before any node) and the node refuses it.
    other = EncryptedInput.decode(clients["digits"].encrypt(examples["digits"].x_test[0]))
    bad = qc.submit(EncryptedInput(env.model_id, env.key_id, other.data).encode())
    with pytest.raises(errors.InvalidInput) as refused:
        bad.result()
    path = platform.stack.data_dir / EVENTS_FILE

    def heard() -> dict[str, dict] | None:
        events = {e.get("task_id"): e for e in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
        return events if {good.id, bad.id} <= set(events) else None

    events = wait_until(heard, 10)
    worker = platform.workers["cancer"]
    assert events[good.id]["moment"] == "computed" and events[good.id]["worker_id"] == worker
    assert events[good.id]["spin_ms"] == 0, "the node's OpenMP runtime sleeps at once (CIPHERPOOL_NODE_SPIN_MS)"
    assert events[bad.id] == {"moment": "refused", "task_id": bad.id, "worker_id": worker, "code": refused.value.code}
