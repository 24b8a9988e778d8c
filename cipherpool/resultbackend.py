"""Celery's Redis result backend, each state stored in one atomic round trip.

Celery's Redis backend stores a task's state (STARTED, then SUCCESS or FAILURE) in two round
trips: it first reads the stored state, so that a duplicate run (a query sent again after a
partition, :mod:`cipherpool.scheduler.redeliver`) never overwrites a SUCCESS, then writes
and publishes the new one in a transaction. Each query paid that read twice, once before its
compute and once before its answer, and the check was not atomic: a duplicate could still
write between the read and the write.

:class:`AtomicRedisBackend` does the same in one server-side script: the stored state is read
and checked, and the new one written and published, in one round trip that nothing can come
between. The script recognises a stored SUCCESS by its head: Celery's meta is a map whose first
entry is its status, so a SUCCESS stored by this serializer begins, after the map's opening (at
most 5 bytes of msgpack, one ``{`` of JSON), with the encoded pair ``status: SUCCESS`` (the
marker, encoded once by the backend's own serializer). A head-match reads no more of a result
than that, however large (Redis's Lua cannot decode msgpack's bin type anyway, and decoding a
large JSON result would hold up Redis, the broker too). A stored value that is not a SUCCESS
in this form is overwritten (Celery's backend would fail on one it cannot decode).

Compressed results (``result_compression``) and other serializers than msgpack and JSON have
no such head: for them this backend is Celery's own, read and write. Everything else (keys,
expiry, failure expiry, the pub/sub message the gateway listens for, retries on connection
errors) is Celery's.

A STARTED is sent off the task's path: Celery stores it before the task body, and waiting for
that round trip delayed every query's compute by it (0.8-1.5 ms measured on a 2-core machine).
Here one sender thread per process stores it while the body runs. Order still holds where it
matters: a task's next state (its SUCCESS, FAILURE or REVOKED, from whichever thread) and any
read of its state in this process first wait for its STARTED to be stored, so a late STARTED
never overwrites a FAILURE; the script refuses it after a SUCCESS anyway. A STARTED that
cannot be stored (Redis gone past Celery's retries), or not within :data:`SETTLE_S` of its
task's next state (no further retry), is logged and dropped: it is a status, and the task's
answer is not.

Chosen by :func:`cipherpool.config.celery.result_backend_url` for ``redis://`` and
``rediss://`` result backends (Celery's ``module:Class+url`` form).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import cached_property
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from redis.commands.core import Script

STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
    -- the marker follows the map's opening: 1 byte (fixmap, JSON's brace), 3 (map16) or 5 (map32)
    local at = string.find(string.sub(current, 1, #ARGV[3] + 5), ARGV[3], 1, true)
    if at and at <= 6 then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


log = logging.getLogger("cipherpool.results")
SETTLE_S = 30.0  # the longest a task's next state waits for its STARTED (then the STARTED is dropped)


class _StartedStates:
    """The STARTED states being stored in this process, and the one thread that stores them.

    Process-wide, not per backend: Celery makes a result backend per thread (without
    ``result_backend_thread_safe``), and a task's next state may be stored from another thread
    than its STARTED (a revoke with ``terminate`` from the worker's main thread, a duplicate run
    in another pool thread). Made again in a forked child (the parent's thread is not there)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, Future[None]] = {}  # task id -> its STARTED, while being stored
        self.superseded: set[str] = set()  # tasks whose next state stopped waiting: their STARTED is dropped
        self._sender: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, task_id: str, store: Callable[[], None]) -> Future[None]:
        with self.lock:
            if self._sender is None or self._pid != os.getpid():
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="cipherpool-started")
                self._pid = os.getpid()
                self.pending.clear()
                self.superseded.clear()
            future = self._sender.submit(store)
            self.pending[task_id] = future
        future.add_done_callback(lambda done: self._stored(task_id, done))
        return future

    def _stored(self, task_id: str, done: Future[None]) -> None:
        with self.lock:
            if self.pending.get(task_id) is done:
                del self.pending[task_id]
                self.superseded.discard(task_id)

    def drain(self) -> None:
        """Wait until every STARTED submitted so far is stored (tests)."""
        with self.lock:
            sender = self._sender
        if sender is not None:
            sender.submit(lambda: None).result()


STARTED_STATES = _StartedStates()


class AtomicRedisBackend(RedisBackend):  # type: ignore[misc]  # Celery ships no types
    """Celery's Redis result backend with :data:`STORE_UNLESS_SUCCEEDED` for every state, and
    STARTED stored off the task's path."""

    @cached_property
    def _store_script(self) -> Script:
        script: Script = self.client.register_script(STORE_UNLESS_SUCCEEDED)
        return script

    @cached_property
    def success_marker(self) -> bytes | None:
        """How a stored SUCCESS begins after its map's opening, in this backend's serializer;
        None where a head says nothing (compressed, or neither msgpack nor JSON)."""
        if self.compression or self.content_type not in ("application/x-msgpack", "application/json"):
            return None
        probe = self.encode({"status": states.SUCCESS})  # a map of one entry: its opening, the pair, its close
        probe = probe.encode() if isinstance(probe, str) else probe
        pair = probe[1:-1] if self.content_type == "application/json" else probe[1:]
        return pair

    def _store_result(
        self, task_id: str | bytes, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        marker = self.success_marker
        if marker is None:
            return super()._store_result(task_id, result, state, traceback, request=request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)
        if state == states.STARTED:
            self._send_started(meta["task_id"], key, value, expires or 0, marker)
            return result
        self._settle(meta["task_id"])
        try:
            self.ensure(self._store, (key, value, expires or 0, marker))
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result

    def _send_started(self, task_id: str, key: bytes | str, value: bytes | str, expires: int, marker: bytes) -> None:
        started = STARTED_STATES

        def attempt(*args: Any) -> None:  # each of Celery's retries asks again
            if task_id not in started.superseded:
                self._store(*args)

        def store() -> None:
            try:
                self.ensure(attempt, (key, value, expires, marker))
            except Exception as exc:  # noqa: BLE001 - a status lost, not an answer: said, and dropped
                log.warning("task %s: its STARTED state was not stored (%s)", task_id, exc)

        started.submit(task_id, store)

    def _settle(self, task_id: str) -> None:
        """Wait for the task's STARTED, if it is still being stored: what comes after it must
        land after it (a FAILURE or a REVOKED is not protected by the script as a SUCCESS is).
        One still not stored after :data:`SETTLE_S` (Redis unreachable, Celery retrying) makes
        no further attempt."""
        started = STARTED_STATES
        with started.lock:
            future = started.pending.get(task_id)
        if future is None:
            return
        try:
            future.result(timeout=SETTLE_S)
        except FutureTimeout:
            with started.lock:
                started.superseded.add(task_id)
            log.warning("task %s: its STARTED state was not stored within %.0f s: dropped", task_id, SETTLE_S)

    def _get_task_meta_for(self, task_id: str) -> Any:
        self._settle(task_id.decode() if isinstance(task_id, bytes) else task_id)  # a read sees this process's writes
        return super()._get_task_meta_for(task_id)

    def _store(self, key: bytes | str, value: bytes | str, expires: int, marker: bytes) -> None:
        self._store_script(keys=[key], args=[value, int(expires), marker])
