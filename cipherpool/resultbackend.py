"""Celery's Redis result backend, each state stored in one atomic round trip.

Celery's Redis backend stores a task's state (STARTED, then SUCCESS or FAILURE) in two round
trips: it first reads the stored state, so that a duplicate run (a query sent again after a
partition, :mod:`cipherpool.scheduler.redeliver`) never overwrites a SUCCESS, then writes
and publishes the new one in a transaction. Each query paid that read twice, once before its
compute and once before its answer, and the check was not atomic: a duplicate could still
write between the read and the write.

:class:`AtomicRedisBackend` does the same in one server-side script: the stored state is read
and checked, and the new one written and published, in one round trip that nothing can come
between. The script reads the stored state's status as the backend wrote it (msgpack by its
head, JSON decoded; see :data:`STORE_UNLESS_SUCCEEDED`); a value it cannot read is
overwritten, as Celery's backend would after failing to read it. Everything else (keys, expiry, failure expiry, the
pub/sub message the gateway listens for, retries on connection errors) is Celery's.

Chosen by :func:`cipherpool.config.celery.result_backend_url` for ``redis://`` and
``rediss://`` result backends (Celery's ``module:Class+url`` form).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from redis.commands.core import Script

# Redis's Lua decodes JSON, but its msgpack has no bin types (the results' ciphertexts are
# bin), so a msgpack state is read by its head: Celery's meta is a map whose first entry is
# its status, so a stored SUCCESS begins with the map's header (1 to 5 bytes) and then
# "status": "SUCCESS" as two msgpack strings (\xa6status \xa7SUCCESS).
STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
    if ARGV[3] == 'json' then
        local ok, meta = pcall(cjson.decode, current)
        if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
    else
        local at = string.find(string.sub(current, 1, 20), '\\166status\\167SUCCESS', 1, true)
        if at and at <= 6 then return 0 end
    end
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


class AtomicRedisBackend(RedisBackend):  # type: ignore[misc]  # Celery ships no types
    """Celery's Redis result backend with :data:`STORE_UNLESS_SUCCEEDED` for every state."""

    @cached_property
    def _store_script(self) -> Script:
        script: Script = self.client.register_script(STORE_UNLESS_SUCCEEDED)
        return script

    def _store_result(
        self, task_id: str | bytes, result: Any, state: str, traceback: Any = None, request: Any = None, **_kwargs: Any
    ) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        kind = "json" if "json" in (self.content_type or "") else "msgpack"
        key = self.get_key_for_task(task_id)
        try:
            self.ensure(self._store, (key, value, expires or 0, kind))
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result

    def _store(self, key: bytes | str, value: bytes | str, expires: int, kind: str) -> None:
        self._store_script(keys=[key], args=[value, int(expires), kind])
