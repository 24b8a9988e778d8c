"""Queries answered, per account, day, model and worker: what usage reports count.

A node hook (beside its statistics and the worker log): each computed query adds one to
``cipherpool:queries:<account>:<UTC day>`` under ``<model>:<worker>`` (``<model>:shared`` on
a shared node). Redis, not the database, for the reason the token counters are there: no
database write on the query path. Counts are for reports; money is the ledger's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime

from redis import Redis

from cipherpool.names import QUERY_COUNT_PREFIX
from cipherpool.workers.hooks import Hook, QueryEvent

KEEP_S = 400 * 24 * 3600  # a year of daily counts, and a month to report on it
SHARED = "shared"


def day_key(account_id: str, day: date) -> str:
    return f"{QUERY_COUNT_PREFIX}{account_id}:{day.isoformat()}"


class QueryCounter(Hook):
    def __init__(self, redis: Callable[[], Redis]):
        self._redis = redis

    def query_computed(self, query: QueryEvent) -> None:
        if not query.account_id or not query.model_id:
            return
        key = day_key(query.account_id, datetime.fromtimestamp(time.time(), UTC).date())
        with self._redis().pipeline() as pipe:
            pipe.hincrby(key, f"{query.model_id}:{query.worker_id or SHARED}", 1)
            pipe.expire(key, KEEP_S)
            pipe.execute()


def counts(redis: Redis, account_id: str, day: date) -> dict[tuple[str, str], int]:
    """``{(model id, worker id or "shared"): queries}`` of one account and day."""
    raw: dict[bytes, bytes] = redis.hgetall(day_key(account_id, day))  # type: ignore[assignment]
    found = {}
    for name, value in raw.items():
        model_id, _, worker = name.decode().partition(":")
        found[(model_id, worker)] = int(value)
    return found
