"""Token usage (queries counted, last use) and quota, kept in Redis.

Counted where a query is accepted (the gateway, or trusted in-cluster code), by one atomic
Lua call: a token at its quota is refused and not counted, and two gateways can never let a
token past its quota together. Every FHE run a token causes counts as a query: a key warm-up
counts one per node it runs on (:func:`charge_runs`). Redis rather than the database: the query path makes no
database round trip (the grant is cached), and a counter write per query would serialise
queries on SQLite. The embedded Redis persists (AOF); the counts live as long as the token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from cipherpool.errors import QuotaExceeded
from cipherpool.names import USAGE_PREFIX

# KEYS[1] the token's usage hash; ARGV[1] quota (-1: none), ARGV[2] now. Returns the count
# after this query, or -1 when the quota is used up (nothing counted).
_CHARGE = """
local used = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local quota = tonumber(ARGV[1])
if quota >= 0 and used >= quota then return -1 end
redis.call('HSET', KEYS[1], 'last', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'n', 1)
"""


# The same for ``ARGV[3]`` runs at once (a key warm-up runs once per serving node): as many as
# the quota has room for. Returns how many were counted, or -1 when none (nothing counted).
_CHARGE_RUNS = """
local used = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local quota = tonumber(ARGV[1])
local runs = tonumber(ARGV[3])
if quota >= 0 then
  if used >= quota then return -1 end
  if used + runs > quota then runs = quota - used end
end
if runs <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'last', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'n', runs)
return runs
"""


@dataclass(frozen=True)
class Usage:
    queries: int = 0
    last_used_at: datetime | None = None


def charge(client: redis.Redis, token_id: str, quota: int | None) -> int:
    """Count one query for the token; QuotaExceeded (and nothing counted) at its quota."""
    used = int(client.eval(_CHARGE, 1, USAGE_PREFIX + token_id, -1 if quota is None else quota, repr(time.time())))
    if used < 0:
        raise QuotaExceeded(f"This access token has used its quota of {quota} queries; ask the model's provider to raise it.")
    return used


def charge_runs(client: redis.Redis, token_id: str, quota: int | None, runs: int) -> int:
    """Count ``runs`` FHE runs for the token at once, each as a query (a key warm-up runs one
    on every node serving the model): as many as its quota has room for, which is returned.
    QuotaExceeded (and nothing counted) when it has room for none, as for a query, even
    when ``runs`` is 0: a token at its quota is refused whatever it asks for."""
    counted = int(
        client.eval(_CHARGE_RUNS, 1, USAGE_PREFIX + token_id, -1 if quota is None else quota, repr(time.time()), max(0, runs))
    )
    if counted < 0:
        raise QuotaExceeded(f"This access token has used its quota of {quota} queries; ask the model's provider to raise it.")
    return counted


def refund(client: redis.Redis, token_id: str, runs: int = 1) -> None:
    """Give back queries counted by :func:`charge` or :func:`charge_runs` that were then not
    published (a broker or store failure), or runs a node did not make (a warm-up whose key
    was cached already): the client's retry must not count twice."""
    if runs > 0:
        client.hincrby(USAGE_PREFIX + token_id, "n", -runs)


def read(client: redis.Redis, token_ids: Iterable[str]) -> dict[str, Usage]:
    ids = list(token_ids)
    pipe = client.pipeline(transaction=False)
    for token_id in ids:
        pipe.hmget(USAGE_PREFIX + token_id, ["n", "last"])
    found = {}
    for token_id, (n, last) in zip(ids, pipe.execute()):
        found[token_id] = Usage(int(n or 0), datetime.fromtimestamp(float(last), UTC) if last else None)
    return found


def exhausted(usage: Usage, quota: int | None) -> bool:
    return quota is not None and usage.queries >= quota


def forget(client: redis.Redis, token_id: str) -> None:
    client.delete(USAGE_PREFIX + token_id)
