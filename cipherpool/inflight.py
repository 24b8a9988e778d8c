"""Queries in flight: a copy of each published query until a node has it.

Why: with Redis as the broker, a node waiting in ``BRPOP`` when a network partition starts
may be handed a query whose reply never reaches it. Redis counts the message delivered, and
kombu records it as unacknowledged (so redeliverable) only once the reply arrives: the query
is in no queue, in no node's hands and will never run. RabbitMQ keeps such a message until the
consumer's connection closes, so there the copy is never needed.

The publisher (:func:`cipherpool.dispatch.submit`) records the message it sends, in the
platform's Redis, before sending it: ``cipherpool:inflight:<query id>`` (a hash: the message,
and when it was last found missing) and an index by publish time. A pool node forgets a
query's record once the query's answer is stored (best effort, off the answer's path:
:mod:`cipherpool.workers.afteranswer`); beat's redelivery
(:mod:`cipherpool.scheduler.redeliver`) forgets the records of started queries and sends
again, under the same id, a query that is found, twice and ``redelivery_grace_s`` apart, in
no queue, in no node's hands and not started. Records die with the query's deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis

from cipherpool.names import INFLIGHT_INDEX_KEY, INFLIGHT_PREFIX

log = logging.getLogger("cipherpool.inflight")
SLACK_S = 60  # a record outlives its query's deadline by this much, for beat to see it expire


@dataclass(frozen=True)
class InflightQuery:
    """What it takes to publish a query again, exactly as it was first sent."""

    task: str
    kwargs: dict[str, Any]
    queue: str  # the queue's name
    routing_key: str
    shadow: str
    deadline: float  # epoch seconds: its ``expires``, absolute, kept across a redelivery

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(asdict(self), use_bin_type=True)
        return packed

    @classmethod
    def unpack(cls, raw: bytes) -> InflightQuery:
        fields = msgpack.unpackb(raw, raw=False)
        return cls(**{k: fields[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Record:
    """A query's record as beat reads it."""

    query_id: str
    message: InflightQuery
    missing_since: float | None  # when beat first found it nowhere (None: not yet)
    sent: int  # how many times it was redelivered


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key(query_id: str) -> str:
    return INFLIGHT_PREFIX + query_id


def record(client: redis.Redis, query_id: str, message: InflightQuery, now: float | None = None) -> None:
    """Keep the message until its query starts (one round trip)."""
    pipe = client.pipeline(transaction=False)
    for write in writes(query_id, message, now):
        pipe.execute_command(*write)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    pipe.execute()


def writes(query_id: str, message: InflightQuery, now: float | None = None) -> list[tuple[str | bytes | int | float, ...]]:
    """The commands of :func:`record`, for a caller that sends them with its own (the submit
    sequence: with the query's count, :func:`cipherpool.services.usage.charge`)."""
    now = time.time() if now is None else now
    key = _key(query_id)
    return [
        ("HSET", key, "message", message.pack(), "sent", 0),
        ("EXPIRE", key, max(1, int(message.deadline - now) + SLACK_S)),
        ("ZADD", INFLIGHT_INDEX_KEY, now, query_id),
    ]


def forget(client: redis.Redis, *query_ids: str) -> None:
    """Drop the records of queries that started, ended, were withdrawn or were never sent."""
    if not query_ids:
        return
    pipe = client.pipeline(transaction=False)
    for command in forgets(*query_ids):
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    pipe.execute()


def forgets(*query_ids: str) -> list[tuple[str, ...]]:
    """The commands of :func:`forget`, for a caller that sends them with its own (a node: after
    the query's answer, :mod:`cipherpool.workers.afteranswer`)."""
    if not query_ids:
        return []
    return [("DEL", *(_key(q) for q in query_ids)), ("ZREM", INFLIGHT_INDEX_KEY, *query_ids)]


def forget_quietly(client: redis.Redis, query_id: str) -> None:
    """:func:`forget`, for a node starting a query: a failure only leaves the record to beat,
    which forgets it once it sees the query started."""
    try:
        forget(client, query_id)
    except redis.RedisError as exc:
        log.debug("could not forget the in-flight record of %s: %s", query_id, exc)


def pages_older_than(client: redis.Redis, published_before: float, size: int = 1000) -> Iterator[list[str]]:
    """Ids of the recorded queries published before ``published_before``, oldest first, a page
    at a time until each was seen once: a backlog of queries waiting their turn never hides a
    newer one. A score cursor, not an offset: the caller forgets records between pages."""
    low: float | str = "-inf"
    seen: set[str] = set()
    while True:
        rows = client.zrangebyscore(INFLIGHT_INDEX_KEY, low, published_before, start=0, num=size, withscores=True)
        page = [(_text(row[0]), float(row[1])) for row in rows if isinstance(row, (tuple, list))]
        page = [(i, score) for i, score in page if i not in seen]
        if not page:
            return
        seen.update(i for i, _ in page)
        low = page[-1][1]  # inclusive: records of the same score are read again, and skipped
        yield [i for i, _ in page]


def load(client: redis.Redis, query_ids: list[str]) -> dict[str, Record | None]:
    """Each id's record (None: gone, its deadline passed long ago)."""
    pipe = client.pipeline(transaction=False)
    for query_id in query_ids:
        pipe.hgetall(_key(query_id))
    found: dict[str, Record | None] = {}
    for query_id, fields in zip(query_ids, pipe.execute(), strict=True):
        if not fields or b"message" not in fields:
            found[query_id] = None
            continue
        missing = fields.get(b"missing")
        found[query_id] = Record(
            query_id,
            InflightQuery.unpack(fields[b"message"]),
            float(missing) if missing else None,
            int(fields.get(b"sent", 0)),
        )
    return found


# Beat's marks touch a record only while it exists: a node may forget it meanwhile, and a mark
# must not bring it back without its expiry.
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'missing' then redis.call('HSET', KEYS[1], 'missing', ARGV[2])
elseif ARGV[1] == 'found' then redis.call('HDEL', KEYS[1], 'missing')
else redis.call('HDEL', KEYS[1], 'missing'); redis.call('HINCRBY', KEYS[1], 'sent', 1) end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def mark_missing(client: redis.Redis, query_id: str, now: float) -> None:
    client.eval(_MARK, 1, _key(query_id), "missing", repr(now))


def mark_found(client: redis.Redis, query_id: str) -> None:
    client.eval(_MARK, 1, _key(query_id), "found", "")


def mark_sent(client: redis.Redis, query_id: str) -> None:
    """After a redelivery: found missing again only by two new looks."""
    client.eval(_MARK, 1, _key(query_id), "sent", "")


def release(client: redis.Redis, lock_key: str, token: str) -> None:
    """Drop a lock only if it is still the caller's (it may have expired and been taken)."""
    client.eval(_RELEASE, 1, lock_key, token)
