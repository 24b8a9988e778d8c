"""Token usage (queries counted, last use) and quota, kept in Redis.

Counted where a query is accepted (the gateway, or trusted in-cluster code), by one atomic
Lua call: a token at its quota is refused and not counted, and two gateways can never let a
token past its quota together. Every FHE run a token causes counts as a query: a key warm-up
counts one per node it runs on (:func:`charge_runs`). Redis rather than the database: the query path makes no
database round trip (the grant is cached), and a counter write per query would serialise
queries on SQLite. The embedded Redis persists (AOF); the counts live as long as the token.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from cipherpool.errors import QuotaExceeded
from cipherpool.names import USAGE_PREFIX

Write = tuple[str | bytes | int | float, ...]  # a Redis command and its arguments: ("SET", key, value, "EX", 60)

# KEYS[1] the token's usage hash; ARGV[1] quota (-1: none), ARGV[2] now. Returns the count
# after this query, or -1 when the quota is used up (nothing counted, nothing written). The
# writes that follow in ARGV (charge's ``then``: each its length, then its command and
# arguments) are made first, so that one Redis refuses (full) leaves the query uncounted.
_CHARGE = """
local used = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local quota = tonumber(ARGV[1])
if quota >= 0 and used >= quota then return -1 end
local i = 3
while i <= #ARGV do
  local len = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + len))
  i = i + len + 1
end
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


_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_CHARGE, _CHARGE_RUNS)}


def _run(client: redis.Redis, script: str, key: str, *args: object) -> int:
    """A script by its digest (EVALSHA: Redis neither receives nor hashes its text again, once
    a query), sent whole (EVAL, which also caches it) the first time a Redis sees it, after a
    restart, or after it evicted it: the same answer either way, in one round trip mostly."""
    try:
        answer: Any = client.evalsha(_SHA[script], 1, key, *args)  # type: ignore[arg-type]
    except redis.exceptions.NoScriptError:
        answer = client.eval(script, 1, key, *args)  # type: ignore[arg-type]
    return int(answer)


@dataclass(frozen=True)
class Usage:
    queries: int = 0
    last_used_at: datetime | None = None


def charge(client: redis.Redis, token_id: str, quota: int | None, *, then: Sequence[Write] = ()) -> int:
    """Count one query for the token; QuotaExceeded (and nothing counted) at its quota.

    ``then``: writes made in the same round trip, atomically with the count and only if the
    query is counted (a refused one writes nothing): what the submit sequence records of a
    query before it publishes it (its owner, its in-flight copy), one round trip instead of
    one each. Each is a command and its arguments; its keys are the platform Redis's own."""
    return counted(_run(client, _CHARGE, USAGE_PREFIX + token_id, *charge_args(quota, then)), quota)


async def charge_async(client: aioredis.Redis, token_id: str, quota: int | None, *, then: Sequence[Write] = ()) -> int:
    """:func:`charge` on an asyncio client of the same Redis (the gateway's event loop)."""
    key, args = USAGE_PREFIX + token_id, charge_args(quota, then)
    try:
        answer: Any = await client.evalsha(_SHA[_CHARGE], 1, key, *args)  # type: ignore[arg-type]
    except redis.exceptions.NoScriptError:
        answer = await client.eval(_CHARGE, 1, key, *args)  # type: ignore[arg-type]
    return counted(int(answer), quota)


def charge_args(quota: int | None, then: Sequence[Write]) -> list[object]:
    """The count's arguments after its key: the quota, now, the writes (for a script that
    counts a query with more, cipherpool.gateway.admission)."""
    args: list[object] = [-1 if quota is None else quota, repr(time.time())]
    for write in then:
        args += [len(write), *write]
    return args


def counted(used: int, quota: int | None) -> int:
    """The count a script answered; QuotaExceeded where it answered -1 (at the quota)."""
    if used < 0:
        raise QuotaExceeded(f"This access token has used its quota of {quota} queries; ask the model's provider to raise it.")
    return used


def charge_runs(client: redis.Redis, token_id: str, quota: int | None, runs: int) -> int:
    """Count ``runs`` FHE runs for the token at once, each as a query (a key warm-up runs one
    on every node serving the model): as many as its quota has room for, which is returned.
    QuotaExceeded (and nothing counted) when it has room for none, as for a query, even
    when ``runs`` is 0: a token at its quota is refused whatever it asks for."""
    counted = _run(client, _CHARGE_RUNS, USAGE_PREFIX + token_id, -1 if quota is None else quota, repr(time.time()), max(0, runs))
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
