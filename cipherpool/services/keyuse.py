"""When each key set was last used (a query or a warm-up with it), recorded cheaply.

A key set unused for ``key_idle_expiry_s`` expires (:mod:`cipherpool.services.keysets`), so
its last use must be known; but the query path makes no database round trip, and a write per
query would serialise queries on SQLite. So a use is recorded in one Redis hash
(:data:`~cipherpool.names.KEY_USE_KEY`, field ``<token id>:<key id>``, value the unix time),
at most once per :data:`RECORD_EVERY_S` per key set and process, and beat's key sweep flushes
the hash into ``evaluation_keys.last_used_at`` (:func:`pending`, then :func:`flushed`).

A use that cannot be recorded (Redis unreachable or full) is logged and skipped: it never
costs a query its answer, and the next use records it (an idle period is days long).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import cast

import redis

from cipherpool.names import KEY_USE_KEY

log = logging.getLogger("cipherpool.keys")
RECORD_EVERY_S = 60.0  # a key set's use is written at most this often per process
MAX_REMEMBERED = 100_000  # key sets whose last write a process remembers (forgotten all at once past it)

# KEYS[1] the hash; ARGV: field, value, field, value, ...: delete each field still at the value
# that was flushed (a use recorded since stays for the next flush).
_FORGET_FLUSHED = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return gone
"""

Uses = dict[tuple[str, str], float]  # (token id, key id) -> unix time of the last use


class _Recent:
    """What this process wrote last, per key set (monotonic time), so that a busy key set
    costs one HSET a minute, not one per query."""

    def __init__(self) -> None:
        self._written: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def due(self, key: tuple[str, str], now: float) -> bool:
        with self._lock:
            last = self._written.get(key)
            return last is None or now - last >= RECORD_EVERY_S

    def wrote(self, key: tuple[str, str], now: float) -> None:
        with self._lock:
            if len(self._written) >= MAX_REMEMBERED:
                self._written.clear()
            self._written[key] = now


_recent = _Recent()


def due(token_id: str, key_id: str) -> bool:
    """Whether :func:`record` would write now (its throttle), without writing."""
    return _recent.due((token_id, key_id), time.monotonic())


def record(client: redis.Redis, token_id: str, key_id: str) -> None:
    """Key set ``key_id`` of token ``token_id`` was used now (throttled, never raises)."""
    key, now = (token_id, key_id), time.monotonic()
    if not _recent.due(key, now):
        return
    try:
        client.hset(KEY_USE_KEY, _field(token_id, key_id), repr(time.time()))
    except redis.RedisError as exc:  # a full or unreachable Redis: the query's own writes will say so
        log.warning("could not record the use of key set %s… of token %s: %s", key_id[:8], token_id, exc)
        return
    _recent.wrote(key, now)


def pending(client: redis.Redis) -> Uses:
    """Every use recorded since the last flush."""
    uses: Uses = {}
    for raw_field, raw_value in cast(Iterable[tuple[bytes, bytes]], client.hscan_iter(KEY_USE_KEY, count=1000)):
        token_id, _, key_id = raw_field.decode().partition(":")
        try:
            uses[(token_id, key_id)] = float(raw_value)
        except ValueError:
            continue
    return uses


def read(client: redis.Redis, token_id: str, key_ids: list[str]) -> dict[str, float]:
    """The uses of these key sets of one token not flushed yet (key id -> unix time)."""
    if not key_ids:
        return {}
    values = cast(list[bytes | None], client.hmget(KEY_USE_KEY, [_field(token_id, k) for k in key_ids]))
    return {key_id: float(value) for key_id, value in zip(key_ids, values) if value is not None}


def flushed(client: redis.Redis, uses: Uses) -> int:
    """Forget the uses that were flushed to the database, unless one was recorded since."""
    args: list[str] = []
    for (token_id, key_id), at in uses.items():
        args += [_field(token_id, key_id), repr(at)]
    return int(cast(int, client.eval(_FORGET_FLUSHED, 1, KEY_USE_KEY, *args))) if args else 0


def _field(token_id: str, key_id: str) -> str:
    return f"{token_id}:{key_id}"
