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

A STARTED is not waited for on the task's path: Celery stores it before the task body, and
waiting for that round trip delayed every query's compute by it (0.8-1.5 ms measured on a
2-core machine). Here the task's thread sends it on a connection of its own and goes on to the
body without reading the reply; the reply is read when the task's next state is stored (its
SUCCESS, FAILURE or REVOKED, from whichever thread) or its state is read in this process, by
then long arrived. Reading it first is what keeps the order: Redis has run the STARTED before
the next state is sent, even on another connection, so a late STARTED never overwrites a
FAILURE (the script refuses it after a SUCCESS anyway). No thread, and nothing runs beside the
body (an earlier sender thread cost the compute 7 % on the shared cores).

A STARTED whose send or read failed is stored once more, synchronously, before the next state
(one attempt: no retries on the task's path). One still unanswered after :data:`SETTLE_S`
(Redis stalled, or a partition) has its connection closed and is logged and dropped: it is a
status, and the task's answer is not. A Redis that never read it never runs it; one that read
it and stalled may still run it late, as a late retry of Celery's could. Each connection
carries one unread STARTED at a time: its thread reads the last one's reply before it sends
the next, whatever became of that task (Celery's Reject or Ignore store no next state; a
duplicate run of the same task in another thread does not take it over).

Chosen by :func:`cipherpool.config.celery.result_backend_url` for ``redis://`` and
``rediss://`` result backends (Celery's ``module:Class+url`` form).
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import Any

import redis
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
SETTLE_S = 30.0  # the longest a task's next state waits for its STARTED's reply (then the STARTED is dropped)


class _Started:
    """A STARTED sent on a connection of its own, its reply not read yet; or, with no
    connection, one whose send failed, stored when it is settled."""

    def __init__(self, backend: AtomicRedisBackend, connection: Any, args: tuple[Any, ...]) -> None:
        self.backend, self.connection, self.args = backend, connection, args
        self.lock = threading.Lock()
        self.settled = False

    def settle(self, task_id: str) -> None:
        """Read the reply (the first caller; others wait for it under the lock). A failed read
        has closed the connection (redis-py's), which its thread's next STARTED opens again."""
        with self.lock:
            if self.settled:
                return
            self.settled = True
            if self.connection is None:
                self._again(task_id)
                return
            try:
                self.connection.read_response(timeout=SETTLE_S)
            except redis.TimeoutError:  # and disconnected
                log.warning("task %s: its STARTED state was not stored within %.0f s: dropped", task_id, SETTLE_S)
            except redis.ConnectionError:
                self._again(task_id)
            except Exception as exc:  # noqa: BLE001 - a status lost, not an answer: said, and dropped
                log.warning("task %s: its STARTED state was not stored (%s)", task_id, exc)

    def _again(self, task_id: str) -> None:
        try:
            self.backend._store(*self.args)
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("task %s: its STARTED state was not stored (%s)", task_id, exc)


class _StartedStates:
    """The STARTED states of this process not settled yet, by task id (a duplicate run may send
    a task's STARTED twice, from two threads).

    Process-wide, not per backend: Celery makes a result backend per thread (without
    ``result_backend_thread_safe``), and a task's next state may be stored from another thread
    than its STARTED (a revoke with ``terminate`` from the worker's main thread, a duplicate run
    in another pool thread). A forked child starts with none (the parent's connections are not
    its own)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, list[_Started]] = {}
        self._pid = os.getpid()

    def add(self, task_id: str, started: _Started) -> None:
        with self.lock:
            self._own()
            self.pending.setdefault(task_id, []).append(started)

    def get(self, task_id: str) -> list[_Started]:
        with self.lock:
            self._own()
            return list(self.pending.get(task_id, ()))

    def done(self, task_id: str, started: _Started) -> None:
        with self.lock:
            entries = self.pending.get(task_id, [])
            if started in entries:
                entries.remove(started)
            if not entries:
                self.pending.pop(task_id, None)

    def _own(self) -> None:
        if self._pid != os.getpid():
            self.pending, self._pid = {}, os.getpid()


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
        """Send the STARTED without reading its reply (:class:`_Started` reads it). EVAL, not
        EVALSHA: a script Redis does not know (a restart) is not found out after the body."""
        own = self._started_local
        if getattr(own, "pid", None) != os.getpid():  # this thread's first, or a forked child's
            pool = self.client.connection_pool
            own.connection, own.pid, own.unread = pool.connection_class(**pool.connection_kwargs), os.getpid(), None
        if own.unread is not None:  # the connection's last STARTED: its reply first
            earlier, unread = own.unread
            unread.settle(earlier)
            STARTED_STATES.done(earlier, unread)
            own.unread = None
        args = (key, value, expires, marker)
        try:
            own.connection.send_command("EVAL", STORE_UNLESS_SUCCEEDED, 1, key, value, int(expires), marker)
        except Exception:  # noqa: BLE001 - Redis unreachable: stored (once) before the next state
            own.connection.disconnect()
            STARTED_STATES.add(task_id, _Started(self, None, args))
            return
        started = _Started(self, own.connection, args)
        own.unread = (task_id, started)
        STARTED_STATES.add(task_id, started)

    @cached_property
    def _started_local(self) -> threading.local:
        """This thread's connection for its STARTED states, outside the client's pool (taking
        and checking a pooled connection per task polls its socket), and the one STARTED unread
        on it."""
        return threading.local()

    def _settle(self, task_id: str) -> None:
        """Read the task's STARTED's replies, if unread: what comes after them must land after
        them (a FAILURE or a REVOKED is not protected by the script as a SUCCESS is)."""
        for started in STARTED_STATES.get(task_id):
            started.settle(task_id)
            STARTED_STATES.done(task_id, started)

    def _get_task_meta_for(self, task_id: str) -> Any:
        self._settle(task_id.decode() if isinstance(task_id, bytes) else task_id)  # a read sees this process's writes
        return super()._get_task_meta_for(task_id)

    def _store(self, key: bytes | str, value: bytes | str, expires: int, marker: bytes) -> None:
        self._store_script(keys=[key], args=[value, int(expires), marker])
