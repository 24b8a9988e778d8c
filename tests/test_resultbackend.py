"""Task states stored in one atomic round trip (cipherpool/resultbackend.py): what Celery's
Redis backend stores and publishes, without its read before each write, and a duplicate run
still never overwrites a SUCCESS."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

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


HELD_S = 60  # a pause no loaded machine outlasts: each test ends it itself


class Pause:
    """Redis holds every write (``CLIENT PAUSE ... WRITE``) until the test ends the pause (or
    the block ends): a STARTED sent meanwhile is not run, and its reply does not come."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.timers: list[threading.Timer] = []
        self.client.client_pause(HELD_S * 1000, all=False)

    def end(self) -> None:
        self.client.client_unpause()

    def end_later(self, after_s: float = 0.2) -> None:
        """From another thread: the test's own next write waits for the pause's end."""
        timer = threading.Timer(after_s, self.end)
        self.timers.append(timer)
        timer.start()

    def cut_every_other_client(self) -> None:
        self.client.client_kill_filter(_type="normal", skipme=True)

    def close(self) -> None:
        for timer in self.timers:
            timer.join()
        self.end()
        self.client.close()


@contextlib.contextmanager
def paused(url: str) -> Iterator[Pause]:
    pause = Pause(url)
    try:
        yield pause
    finally:
        pause.close()


def stored_before_each_write(results: AtomicRedisBackend, url: str, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The status Redis holds for a key (reads are not paused) at each write of ``results``
    other than a STARTED sent by its thread: what each write finds when it is sent."""
    reader, seen, store = redis.Redis.from_url(url), [], results._store

    def recording(key, value, expires, marker):
        held = reader.get(key)
        seen.append(results.decode(held)["status"] if held else None)
        store(key, value, expires, marker)

    monkeypatch.setattr(results, "_store", recording)
    return seen


def test_a_started_is_not_waited_for_and_its_failure_is_sent_after_it_ran(url, monkeypatch):
    """The task body does not wait for its STARTED's reply (Redis holds it); its FAILURE reads
    it first, so the STARTED has run before the FAILURE is sent (the script guards a SUCCESS
    only)."""
    results, reader = backend(url), redis.Redis.from_url(url)
    seen = stored_before_each_write(results, url, monkeypatch)
    with paused(url) as pausing:
        began = time.monotonic()
        results.store_result("s1", {"pid": 1}, states.STARTED)
        assert time.monotonic() - began < HELD_S / 2  # returned while Redis held it
        assert STARTED_STATES.get("s1") and reader.get("celery-task-meta-s1") is None
        pausing.end_later()
        results.store_result("s1", ValueError("x"), states.FAILURE)
    assert seen == [states.STARTED]  # the FAILURE was sent once Redis had run the STARTED
    assert results.decode(reader.get("celery-task-meta-s1"))["status"] == states.FAILURE
    assert not STARTED_STATES.get("s1")


def test_a_read_in_the_same_process_sees_its_started(url):
    results = backend(url)
    with paused(url) as pausing:
        results.store_result("s2", {"pid": 1}, states.STARTED)
        pausing.end_later()
        assert results._get_task_meta_for("s2")["status"] == states.STARTED


def test_a_started_whose_connection_failed_is_stored_again_before_the_next_state(url):
    """The STARTED's connection is cut before Redis ran it (a network fault): it is stored once
    more, synchronously, before the task's next state."""
    results, reader = backend(url), redis.Redis.from_url(url)
    with paused(url) as pausing:
        results.store_result("s3", {"pid": 1}, states.STARTED)
        pausing.cut_every_other_client()  # every other client: the STARTED's cut
    assert reader.get("celery-task-meta-s3") is None  # it never ran
    assert results._get_task_meta_for("s3")["status"] == states.STARTED  # stored again, then read
    results.store_result("s3", {"ok": True}, states.SUCCESS)
    assert results._get_task_meta_for("s3")["status"] == states.SUCCESS


def test_a_started_whose_send_failed_is_stored_once_before_the_next_state(url, monkeypatch):
    """Redis unreachable as the task starts: the task does not wait through Celery's retries
    (twenty, a second apart); its STARTED is stored once, first, when its next state is."""
    results = backend(url)
    results.store_result("s3a", {"pid": 1}, states.STARTED)  # this thread's connection, opened
    results.store_result("s3a", {"ok": True}, states.SUCCESS)
    seen = stored_before_each_write(results, url, monkeypatch)

    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("unreachable")

    monkeypatch.setattr(results._started_local.connection, "send_command", unreachable)
    began = time.monotonic()
    results.store_result("s3b", {"pid": 1}, states.STARTED)
    assert time.monotonic() - began < 5 and [s.connection for s in STARTED_STATES.get("s3b")] == [None]
    results.store_result("s3b", {"ok": True}, states.SUCCESS)
    assert seen == [None, states.STARTED]  # the STARTED stored, then the SUCCESS over it
    assert results._get_task_meta_for("s3b")["status"] == states.SUCCESS


def test_a_started_that_cannot_be_stored_is_logged_and_the_answer_still_is(url, caplog):
    """Its connection cut, and stored again into a key Redis refuses (of another type): logged
    and dropped, and the task's answer is stored as ever."""
    results, reader = backend(url), redis.Redis.from_url(url)
    reader.rpush("not-a-result", b"x")
    with caplog.at_level(logging.WARNING, logger="cipherpool.results"):
        with paused(url) as pausing:
            results.store_result("s3c", {"pid": 1}, states.STARTED)
            [unread] = STARTED_STATES.get("s3c")
            unread.args = ("not-a-result", *unread.args[1:])  # where it is stored again: WRONGTYPE
            pausing.cut_every_other_client()
        results.store_result("s3c", {"ok": True}, states.SUCCESS)
    assert "s3c: its STARTED state was not stored (WRONGTYPE" in caplog.text
    assert results._get_task_meta_for("s3c")["status"] == states.SUCCESS


def test_a_state_stored_by_another_threads_backend_lands_after_the_started(url, monkeypatch):
    """Celery makes a backend per thread: a revoke with ``terminate`` stores REVOKED from the
    worker's main thread while the pool thread's STARTED may still be unanswered. The unread
    STARTED states are the process's, so the REVOKED reads it first, as a FAILURE does."""
    in_pool_thread, in_main_thread = backend(url), backend(url)
    seen = stored_before_each_write(in_main_thread, url, monkeypatch)
    with paused(url) as pausing:
        in_pool_thread.store_result("s4", {"pid": 1}, states.STARTED)
        pausing.end_later()
        in_main_thread.mark_as_revoked("s4", "terminated")
    assert seen == [states.STARTED]
    assert in_main_thread._get_task_meta_for("s4")["status"] == states.REVOKED
    assert not STARTED_STATES.get("s4")


def test_a_duplicate_run_in_another_thread_takes_over_no_connections_reply(url, monkeypatch):
    """A task sent again runs twice, in two threads of one node: both STARTED states are read
    before the task's next state, and each thread's connection stays one reply in step (its
    next task's STARTED is read, not the duplicate's)."""
    first, second = backend(url), backend(url)
    seen = stored_before_each_write(first, url, monkeypatch)
    with paused(url) as pausing:
        first.store_result("s8", {"pid": 1}, states.STARTED)
        second.store_result("s8", {"pid": 2}, states.STARTED)
        assert len(STARTED_STATES.get("s8")) == 2
        pausing.end_later()
        first.store_result("s8", {"ok": True}, states.SUCCESS)
    assert seen == [states.STARTED] and not STARTED_STATES.get("s8")
    with paused(url) as pausing:
        first.store_result("s9", {"pid": 1}, states.STARTED)  # the connection's last reply was read
        pausing.end_later()
        first.store_result("s9", ValueError("x"), states.FAILURE)
    assert seen == [states.STARTED, states.STARTED]  # s9's own STARTED ran first, not merely s8's


def test_a_started_unanswered_past_the_wait_is_dropped_and_never_runs(url, monkeypatch, caplog):
    """Redis holds the STARTED past :data:`SETTLE_S`: the next state stops waiting, the
    STARTED's connection is closed, so the Redis that never read it never runs it, and the
    next state is stored."""
    results, reader = backend(url), redis.Redis.from_url(url)
    listener = reader.pubsub()
    listener.subscribe("celery-task-meta-s5")  # every state stored is published here
    monkeypatch.setattr(resultbackend, "SETTLE_S", 0.3)

    class UnpauseOnDrop(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "dropped" in record.getMessage():
                pausing.end()  # only once the wait has given up

    handler = UnpauseOnDrop()
    logging.getLogger("cipherpool.results").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="cipherpool.results"), paused(url) as pausing:
            results.store_result("s5", {"pid": 1}, states.STARTED)
            results.store_result("s5", ValueError("x"), states.FAILURE)  # 0.3 s, then sent: runs after the unpause
    finally:
        logging.getLogger("cipherpool.results").removeHandler(handler)
    assert "s5: its STARTED state was not stored within 0 s: dropped" in caplog.text
    published, until = [], time.monotonic() + 1.0
    while time.monotonic() < until:
        message = listener.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            published.append(results.decode(message["data"])["status"])
    assert published == [states.FAILURE]  # the STARTED never ran
    assert results.decode(reader.get("celery-task-meta-s5"))["status"] == states.FAILURE
    assert not STARTED_STATES.get("s5")
    listener.close()


def test_a_task_that_ended_without_a_next_state_is_read_at_the_threads_next_started(url):
    """Celery's Reject and Ignore store no next state: the thread's next STARTED reads the
    earlier one's reply first, so its one connection carries one unread STARTED at a time."""
    results = backend(url)
    results.store_result("s6", {"pid": 1}, states.STARTED)  # then Ignore: nothing more
    [first] = STARTED_STATES.get("s6")
    results.store_result("s7", {"pid": 1}, states.STARTED)
    [second] = STARTED_STATES.get("s7")
    assert not STARTED_STATES.get("s6") and first.settled and not second.settled
    assert first.connection is second.connection  # the thread's own, outside the client's pool
    results.store_result("s7", {"ok": True}, states.SUCCESS)
    assert second.settled and results._get_task_meta_for("s6")["status"] == states.STARTED
