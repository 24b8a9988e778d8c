"""The guard's rate count and a query's admission as one script: one Redis round trip fewer.

Every request's rate is counted, and the change counters read, by the guard before any route
reads its body (:mod:`cipherpool.gateway.guard`); a query published from the event loop is then
counted against its token's quota, recorded and queued by a second script
(:func:`~cipherpool.services.usage.charge_async`). Two round trips on the query's path, each a
wake-up of Redis and of the gateway: 0.4-0.6 ms apiece once a long compute has left the
machine idle (digits, benchmarks/wake_floor.py).

For the request that can take the event loop's path (``POST /v1/queries`` from a token whose
lookups are all cached, its body declared at most :data:`LOOP_MAX_BYTES`), the guard leaves its
count to the admission: a :class:`~cipherpool.gateway.guard.PendingCount` in the request's
state. :data:`ADMIT` then does both in order:

1. counts the rate windows (a write Redis refuses when full: ``refused``, nothing admitted;
   the guard's own count then counts in this process, as it does whenever Redis is full);
2. over a limit, answers ``rate`` (the guard's 429) and admits nothing;
3. reads the change counters; moved since this gateway last read them (a credential revoked,
   a model's workers changed), answers ``changed`` and admits nothing: the gateway
   authenticates again and the query goes the ordinary way, its rate counted already;
4. else it is :func:`~cipherpool.services.usage.charge_async`'s script: the quota, the writes
   (the owner, the in-flight copy, the message and its event), the count.

Whatever else the route does with such a request (a body refused, a query that goes to the
thread pool) settles the count first, as the guard would have made it, and a request that
never reached the route (its parameters refused) has it settled by the guard after the answer:
every request is counted once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from cipherpool.errors import CipherpoolError
from cipherpool.gateway.admit import COUNTERS, Seen, after_count, as_counter, authenticate_and_count, count_cached
from cipherpool.gateway.auth import Principal
from cipherpool.gateway.ratelimit import RateLimiter
from cipherpool.gateway.state import GatewayState
from cipherpool.names import USAGE_PREFIX
from cipherpool.outages import OUTAGE_TYPES
from cipherpool.services import usage
from cipherpool.services.queries import TokenGrant

LOOP_MAX_BYTES = 64 * 1024  # a body up to this is published from the event loop (its message built there: ~0.3 ms)

# KEYS: the rate windows (ARGV[1] of them), the credential and serving change counters, the
# token's usage hash. ARGV: [1] windows, [2] cost, [3] a window's expiry, then each window's
# limit, the two counters as this gateway last read them ('' for none), then as usage._CHARGE:
# quota (-1: none), now, the writes (each its length, then its command and arguments).
# Answers {code, used, credential counter, serving counter, each window's count}.
ADMIT = """
local n = tonumber(ARGV[1])
local counts = {}
for i = 1, n do
  local c = redis.pcall('INCRBY', KEYS[i], ARGV[2])
  if type(c) ~= 'number' then return {'refused', 0} end
  redis.pcall('EXPIRE', KEYS[i], ARGV[3])
  counts[i] = c
end
local seen = redis.call('MGET', KEYS[n + 1], KEYS[n + 2])
local function answer(code, used)
  local out = {code, used, seen[1], seen[2]}
  for i = 1, n do out[4 + i] = counts[i] end
  return out
end
for i = 1, n do
  if counts[i] > tonumber(ARGV[3 + i]) then return answer('rate', 0) end
end
local a = 4 + n
if (seen[1] or '') ~= ARGV[a] or (seen[2] or '') ~= ARGV[a + 1] then return answer('changed', 0) end
local usage = KEYS[n + 3]
local used = tonumber(redis.call('HGET', usage, 'n') or '0')
local quota = tonumber(ARGV[a + 2])
if quota >= 0 and used >= quota then return answer('quota', -1) end
local i = a + 4
while i <= #ARGV do
  local len = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + len))
  i = i + len + 1
end
redis.call('HSET', usage, 'last', ARGV[a + 3])
return answer('ok', redis.call('HINCRBY', usage, 'n', 1))
"""
ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest()
log = logging.getLogger("cipherpool.gateway")


PENDING = "pending_count"  # the request state's key of its PendingCount


@dataclass
class PendingCount:
    """The guard's count of a request, left to its query's admission (:func:`admit`).
    Whatever the route does instead, it first :meth:`settle` s it; the guard settles it after
    the answer if the route never did. ``seen``: the change counters as the guard had them
    before it read the cache (the admission admits nothing if they moved since)."""

    gw: GatewayState
    credential: str
    source: str
    principal: TokenGrant  # as cached
    served: TokenGrant  # with its serving state, as cached: the grant the route goes on with
    seen: Seen
    done: bool = False

    async def settle(self) -> Principal:
        """The guard's count and change-counter read, made now as the guard would have made it:
        the principal to go on with (authenticated again after a change), RateLimited over a
        rate. Once: the admission counted it, or this did."""
        self.done = True
        client = self.gw.waiter.client_for(self.gw.settings.effective_store_url())
        if client is None:  # the waiter's client is not this loop's now: the thread pool's way
            return await run_in_threadpool(authenticate_and_count, self.gw, f"Bearer {self.credential}", self.source)
        return await count_cached(self.gw, client, self.credential, self.source, self.principal, self.seen)

    async def settle_quietly(self) -> None:
        """:meth:`settle` for a request already answered: counted, whatever it would refuse."""
        try:
            await self.settle()
        except CipherpoolError:
            pass
        except OUTAGE_TYPES as exc:
            log.warning("a request's rate could not be counted after its answer: %s", exc)

    async def changed(self, now: Seen) -> Principal:
        """The admission found the change counters moved (``now``, as it read them), counted
        the rate and admitted nothing: the principal to go again with."""
        self.done = True
        return await after_count(self.gw, self.credential, self.source, self.principal, self.seen, now)


class Admitted(StrEnum):
    """What :func:`admit` did with the query."""

    QUEUED = "ok"  # counted, admitted and queued
    CHANGED = "changed"  # rate counted, nothing admitted: authenticate again, then the ordinary way
    REFUSED = "refused"  # Redis refused the count (full): nothing counted there, nothing admitted


async def admit(
    client: aioredis.Redis, limiter: RateLimiter, pending: PendingCount, quota: int | None, then: Sequence[usage.Write]
) -> tuple[Admitted, Seen]:
    """Count the request's rate and admit the query in one round trip (see the module).

    RateLimited over a rate, QuotaExceeded at the quota (the rate counted, nothing admitted).
    Else what was done, and the change counters as read (for :meth:`PendingCount.changed`)."""
    pending.done = True  # counted by the script, or lost with its round trip
    grant = pending.principal
    windows = limiter.windows(grant.account_id, grant.token_id)
    expected = [b"" if seen is None else seen for seen in pending.seen]
    keys = [*windows.keys, *COUNTERS, USAGE_PREFIX + grant.token_id]
    args = [len(windows.keys), windows.cost, windows.expiry, *windows.limits, *expected, *usage.charge_args(quota, then)]
    try:
        answer: Any = await client.evalsha(ADMIT_SHA, len(keys), *keys, *args)  # type: ignore[arg-type]
    except redis.exceptions.NoScriptError:  # a restarted Redis: sent whole once (and cached)
        answer = await client.eval(ADMIT, len(keys), *keys, *args)  # type: ignore[arg-type]
    code = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
    if code == Admitted.REFUSED:
        return Admitted.REFUSED, (None, None)
    if code == "rate":
        limiter.refuse_over(windows, [int(count) for count in answer[4:]])  # raises
    if code == "quota":
        usage.counted(int(answer[1]), quota)  # raises
    if code not in (Admitted.QUEUED, Admitted.CHANGED):
        raise RuntimeError(f"the admission script answered {code!r}")
    return Admitted(code), (as_counter(answer[2]), as_counter(answer[3]))
