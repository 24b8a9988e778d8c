"""Queries answered, per account, day, model and worker: what usage reports count.

Each computed query adds one to ``cipherpool:queries:<account>:<UTC day>`` under
``<model>:<worker>`` (``<model>:shared`` on a shared node): pool nodes write it (their
:class:`~cipherpool.workers.querycount.QueryCounter` hook), usage reports read it
(:mod:`cipherpool.billing.usage`). Redis, not the database, for the reason the token
counters are there: no database write on the query path. Counts are for reports; money is the
ledger's.
"""

from __future__ import annotations

from datetime import date

from redis import Redis

from cipherpool.names import QUERY_COUNT_PREFIX

KEEP_S = 400 * 24 * 3600  # a year of daily counts, and a month to report on it
SHARED = "shared"


def day_key(account_id: str, day: date) -> str:
    return f"{QUERY_COUNT_PREFIX}{account_id}:{day.isoformat()}"


def count(redis: Redis, account_id: str, model_id: str, worker_id: str | None, day: date) -> None:
    """One more query answered by ``worker_id`` (None: a shared node) on ``day``."""
    with redis.pipeline() as pipe:
        for command in counting(account_id, model_id, worker_id, day):
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        pipe.execute()


def counting(account_id: str, model_id: str, worker_id: str | None, day: date) -> list[tuple[str | int, ...]]:
    """The commands of :func:`count`, for a caller that sends them with its own (a node: after
    the query's answer, :mod:`cipherpool.workers.afteranswer`)."""
    key = day_key(account_id, day)
    return [("HINCRBY", key, f"{model_id}:{worker_id or SHARED}", 1), ("EXPIRE", key, KEEP_S)]


def counts(redis: Redis, account_id: str, day: date) -> dict[tuple[str, str], int]:
    """``{(model id, worker id or "shared"): queries}`` of one account and day."""
    raw: dict[bytes, bytes] = redis.hgetall(day_key(account_id, day))  # type: ignore[assignment]
    found = {}
    for name, value in raw.items():
        model_id, _, worker = name.decode().partition(":")
        found[(model_id, worker)] = int(value)
    return found
