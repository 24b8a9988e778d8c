"""Queries in flight: a copy of each published query until a node starts it.

Why: with Redis as the broker, a node waiting in ``BRPOP`` when a network partition starts
may be handed a query whose reply never reaches it. Redis counts the message delivered, and
kombu records it as unacknowledged (so redeliverable) only once the reply arrives: the query
is in no queue, in no node's hands and will never run. RabbitMQ keeps such a message until the
consumer's connection closes, so there the copy is never needed.

The publisher (:func:`cipherpool.dispatch.submit`) records the message it sends, in the
platform's Redis, before sending it: ``cipherpool:inflight:<query id>`` (a hash: the message,
and when it was last found missing) and an index by publish time. A node forgets a query's
record when it starts it (best effort); beat's redelivery
(:mod:`cipherpool.scheduler.redeliver`) forgets the records of started queries and sends
again, under the same id, a query that is found, twice and ``redelivery_grace_s`` apart, in
no queue, in no node's hands and not started. Records die with the query's deadline.
"""

from __future__ import annotations

import logging
import time
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


def _key(query_id: str) -> str:
    return INFLIGHT_PREFIX + query_id


def record(client: redis.Redis, query_id: str, message: InflightQuery, now: float | None = None) -> None:
    """Keep the message until its query starts (one round trip)."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.hset(_key(query_id), mapping={"message": message.pack(), "sent": 0})
    pipe.expire(_key(query_id), max(1, int(message.deadline - now) + SLACK_S))
    pipe.zadd(INFLIGHT_INDEX_KEY, {query_id: now})
    pipe.execute()


def forget(client: redis.Redis, *query_ids: str) -> None:
    """Drop the records of queries that started, ended, were withdrawn or were never sent."""
    if not query_ids:
        return
    pipe = client.pipeline(transaction=False)
    pipe.delete(*(_key(q) for q in query_ids))
    pipe.zrem(INFLIGHT_INDEX_KEY, *query_ids)
    pipe.execute()


def forget_quietly(client: redis.Redis, query_id: str) -> None:
    """:func:`forget`, for a node starting a query: a failure only leaves the record to beat,
    which forgets it once it sees the query started."""
    try:
        forget(client, query_id)
    except redis.RedisError as exc:
        log.debug("could not forget the in-flight record of %s: %s", query_id, exc)


def older_than(client: redis.Redis, published_before: float, limit: int = 1000) -> list[str]:
    """Ids of the recorded queries published before ``published_before``, oldest first."""
    ids = client.zrangebyscore(INFLIGHT_INDEX_KEY, "-inf", published_before, start=0, num=limit)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


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


def mark_missing(client: redis.Redis, query_id: str, now: float) -> None:
    client.hset(_key(query_id), "missing", repr(now))


def mark_found(client: redis.Redis, query_id: str) -> None:
    client.hdel(_key(query_id), "missing")


def mark_sent(client: redis.Redis, query_id: str) -> None:
    """After a redelivery: found missing again only by two new looks."""
    pipe = client.pipeline(transaction=False)
    pipe.hdel(_key(query_id), "missing")
    pipe.hincrby(_key(query_id), "sent", 1)
    pipe.execute()
