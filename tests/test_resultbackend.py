"""Task states stored in one atomic round trip (cipherpool/resultbackend.py): what Celery's
Redis backend stores and publishes, without its read before each write, and a duplicate run
still never overwrites a SUCCESS."""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import pytest
import redis
from celery import Celery, states
from celery.app.task import Context

from cipherpool import resultbackend
from cipherpool.config.celery import ATOMIC_REDIS_BACKEND, result_backend_url
from cipherpool.config.settings import Settings
from cipherpool.resultbackend import STARTED_STATES, AtomicRedisBackend
from tests.helpers import own_redis


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with own_redis(tmp_path_factory, "results") as found:
        yield found


def backend(url: str, serializer: str = "msgpack", **conf: object) -> AtomicRedisBackend:
    app = Celery("t", backend=result_backend_url(url))
    app.conf.update(
        result_serializer=serializer, result_accept_content=[serializer], result_expires=60, result_failure_expires=30, **conf
    )
    made = app.backend
    assert isinstance(made, AtomicRedisBackend)
    return made


def test_only_redis_backends_are_replaced_and_the_platforms_config_names_it(tmp_path):
    assert result_backend_url("redis://h:6379/0") == f"{ATOMIC_REDIS_BACKEND}+redis://h:6379/0"
    assert result_backend_url("rediss://:p+w@h/1") == f"{ATOMIC_REDIS_BACKEND}+rediss://:p+w@h/1"
    assert result_backend_url("sentinel://h:26379") == "sentinel://h:26379"
    from cipherpool.config.celery import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    assert isinstance(app.backend, AtomicRedisBackend) and app.backend.url == "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(("serializer", "conf"), [("msgpack", {}), ("json", {}), ("msgpack", {"result_extended": True})])
def test_states_are_stored_and_published_and_a_success_is_never_overwritten(url, serializer, conf, monkeypatch):
    results = backend(url, serializer, **conf)
    client = redis.Redis.from_url(url)
    monkeypatch.setattr(results, "get", lambda _key: pytest.fail("no read before a write"))
    task_id = f"{serializer}-{len(conf)}"
    key = f"celery-task-meta-{task_id}"
    listener = client.pubsub()
    listener.subscribe(key)
    assert listener.get_message(timeout=2)["type"] == "subscribe"

    # result_extended: with a task's stamps, more entries than a fixmap holds: a map16 header
    stamps = {f"s{i}": i for i in range(4)}
    request = Context(
        id=task_id, task="t.q", args=[], kwargs={}, hostname="h", retries=0, stamped_headers=list(stamps), stamps=stamps
    )
    results.store_result(task_id, {"pid": 1}, states.STARTED, request=request)
    message = listener.get_message(timeout=2)
    assert message["data"] == client.get(key) and 0 < client.ttl(key) <= 60
    value = b"\xa6status\xa7SUCCESS" * 3 if serializer == "msgpack" else "SUCCESS"  # bin data that looks like a status
    results.store_result(task_id, {"ok": True, "value": value}, states.SUCCESS, request=request)
    stored = client.get(key)
    assert results.decode_result(stored)["status"] == states.SUCCESS
    # A duplicate run (a query sent again) starts, fails: neither overwrites, nor is published.
    results.store_result(task_id, {"pid": 2}, states.STARTED, request=request)
    results.store_result(task_id, ValueError("again"), states.FAILURE, request=request)
    assert client.get(key) == stored
    assert listener.get_message(timeout=2)["data"] == stored and listener.get_message(timeout=0.2) is None
    if serializer == "msgpack":
        assert msgpack.unpackb(stored, raw=False)["result"]["value"] == value
    if conf:
        assert stored[:1] == b"\xde"  # the marker 3 bytes in


def test_compressed_results_are_stored_by_celerys_own_read_and_write(url):
    """A compressed value has no head to recognise: Celery's backend reads it first, as before."""
    results = backend(url, result_compression="gzip")
    assert results.success_marker is None
    results.store_result("z1", {"ok": True}, states.SUCCESS)
    reads: list[object] = []
    get = results.get
    results.get = lambda key: reads.append(key) or get(key)  # type: ignore[method-assign]
    results.store_result("z1", {"pid": 2}, states.STARTED)
    assert reads and results._get_task_meta_for("z1")["status"] == states.SUCCESS


def test_a_failure_keeps_the_failure_expiry_and_a_started_after_it_may_overwrite(url):
    results = backend(url)
    client = redis.Redis.from_url(url)
    results.store_result("f1", ValueError("x"), states.FAILURE)
    assert 0 < client.ttl("celery-task-meta-f1") <= 30
    results.store_result("f1", {"pid": 1}, states.STARTED)  # retried: only a SUCCESS is final here, as in Celery
    assert results._get_task_meta_for("f1")["status"] == states.STARTED


def test_a_stored_value_that_is_not_a_success_is_overwritten(url):
    """Celery's backend would fail on a value it cannot decode; the script overwrites it."""
    results = backend(url)
    client = redis.Redis.from_url(url)
    client.set("celery-task-meta-g1", b"not msgpack")
    results.store_result("g1", {"pid": 1}, states.STARTED)
    assert results._get_task_meta_for("g1")["status"] == states.STARTED


def _gated(results: AtomicRedisBackend, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every STARTED in the sender until the returned event is set."""
    gate = threading.Event()
    store = results._store

    def held(key, value, expires, marker):
        if results.decode(value)["status"] == states.STARTED:
            assert gate.wait(10)
        store(key, value, expires, marker)

    monkeypatch.setattr(results, "_store", held)
    return gate


def _drained(results: AtomicRedisBackend) -> None:
    STARTED_STATES.drain()  # one sender thread: all before it are done


def test_a_started_is_stored_off_the_tasks_path_and_its_failure_lands_after_it(url, monkeypatch):
    """The task body does not wait for its STARTED's round trip; its FAILURE waits for the
    STARTED still being stored, so the late STARTED never overwrites it (the script guards a
    SUCCESS only)."""
    results = backend(url)
    client = redis.Redis.from_url(url)
    gate = _gated(results, monkeypatch)
    began = time.monotonic()
    results.store_result("s1", {"pid": 1}, states.STARTED)
    assert time.monotonic() - began < 1.0 and client.get("celery-task-meta-s1") is None  # not stored yet
    threading.Timer(0.3, gate.set).start()
    results.store_result("s1", ValueError("x"), states.FAILURE)
    assert gate.is_set()  # the FAILURE was stored after the STARTED, not before it
    _drained(results)
    assert results.decode(client.get("celery-task-meta-s1"))["status"] == states.FAILURE
    assert "s1" not in STARTED_STATES.pending


def test_a_read_in_the_same_process_sees_its_started(url, monkeypatch):
    results = backend(url)
    gate = _gated(results, monkeypatch)
    results.store_result("s2", {"pid": 1}, states.STARTED)
    threading.Timer(0.3, gate.set).start()
    assert results._get_task_meta_for("s2")["status"] == states.STARTED


def test_a_started_that_cannot_be_stored_is_logged_and_the_answer_still_is(url, monkeypatch, caplog):
    results = backend(url)
    store = results._store

    def refusing(key, value, expires, marker):
        if results.decode(value)["status"] == states.STARTED:
            raise ValueError("refused")
        store(key, value, expires, marker)

    monkeypatch.setattr(results, "_store", refusing)
    with caplog.at_level(logging.WARNING, logger="cipherpool.results"):
        results.store_result("s3", {"pid": 1}, states.STARTED)
        results.store_result("s3", {"ok": True}, states.SUCCESS)
        _drained(results)
    assert "s3: its STARTED state was not stored (refused)" in caplog.text
    assert results._get_task_meta_for("s3")["status"] == states.SUCCESS


def test_a_state_stored_by_another_threads_backend_lands_after_the_started(url, monkeypatch):
    """Celery makes a backend per thread: a revoke with ``terminate`` stores REVOKED from the
    worker's main thread while the pool thread's STARTED may still be on its way. The pending
    STARTED states are the process's, so the REVOKED waits for it as a FAILURE does."""
    in_pool_thread, in_main_thread = backend(url), backend(url)
    gate = _gated(in_pool_thread, monkeypatch)
    in_pool_thread.store_result("s4", {"pid": 1}, states.STARTED)
    threading.Timer(0.3, gate.set).start()
    in_main_thread.mark_as_revoked("s4", "terminated")
    _drained(in_pool_thread)
    assert in_main_thread._get_task_meta_for("s4")["status"] == states.REVOKED


def test_a_started_still_retrying_when_its_next_state_stops_waiting_makes_no_more_attempts(url, monkeypatch, caplog):
    """Redis unreachable for the STARTED (Celery's backend retries it) past :data:`SETTLE_S`:
    the next state stops waiting and is stored, and the STARTED's retries stop."""
    results = backend(url)
    store, attempts = results._store, []

    def unreachable(key, value, expires, marker):
        if results.decode(value)["status"] == states.STARTED:
            attempts.append(1)
            raise redis.ConnectionError("unreachable")
        store(key, value, expires, marker)

    monkeypatch.setattr(results, "_store", unreachable)
    monkeypatch.setattr(resultbackend, "SETTLE_S", 0.3)
    with caplog.at_level(logging.WARNING, logger="cipherpool.results"):
        results.store_result("s5", {"pid": 1}, states.STARTED)
        results.store_result("s5", ValueError("x"), states.FAILURE)  # waits 0.3 s, then is stored
        _drained(results)
    assert "s5: its STARTED state was not stored within 0 s: dropped" in caplog.text
    assert 1 <= len(attempts) <= 2  # retries go on for seconds otherwise
    assert results._get_task_meta_for("s5")["status"] == states.FAILURE
    assert "s5" not in STARTED_STATES.superseded and "s5" not in STARTED_STATES.pending
