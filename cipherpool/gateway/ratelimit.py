"""Per-token and per-account request rates, counted in Redis so that several gateways share
them: fixed one-second windows (INCRBY + EXPIRE). Over the rate the answer is HTTP 429 with
``Retry-After``; 0 disables a limit. The counts, and the keys the guard reads with them (its
change counters), are one script run by its digest: one reply to parse rather than five (a
pipeline's replies were about a sixth of the gateway's CPU on a query, py-spy).

The client is the store's, so a round trip on a connection that died (a Redis restart) is
sent again once on a new one (:data:`cipherpool.store.STALE_RETRIES`): a restart costs no
request. Should Redis die after counting but before answering, the retry counts that request
twice in its window, which errs on the safe side of a rate.

**When Redis is full** (``maxmemory`` with ``noeviction``: it refuses INCR, a write, while reads
and deletes still work), the limiter counts in this gateway process instead, with the same
limits and windows, and logs one warning for the whole episode (and one line when Redis takes
writes again). So requests are neither refused wholesale (failing closed with 503 would stop
the very reads, polls and deletes that let users and providers free memory: deleting a token
or a key set) nor let through unbounded (failing open would hand a flood a full platform): each
gateway enforces the rate alone, so with N gateways a principal gets at most N times its rate
meanwhile. The change counters are still read in the same round trip (a read)."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from cipherpool.errors import RateLimited
from cipherpool.names import RATE_PREFIX
from cipherpool.outages import redis_full
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.gateway")
WINDOW_S = 1
REFUSED_MAX = 10_000  # subjects remembered as refused (cleared whole when full: a refusal is only a hint)
# KEYS: the windows to count in (ARGV[3] of them), then the keys to read. Each count is
# answered, or the error that refused it (pcall: a full Redis refuses INCRBY, a write, and the
# read after it must still be answered); then the values read, as one array.
COUNT_AND_READ = """
local counted, out = tonumber(ARGV[3]), {}
for i = 1, counted do
    out[i] = redis.pcall('INCRBY', KEYS[i], ARGV[1])
    if type(out[i]) == 'number' then redis.pcall('EXPIRE', KEYS[i], ARGV[2]) end
end
if #KEYS > counted then out[counted + 1] = redis.call('MGET', unpack(KEYS, counted + 1)) end
return out
"""
COUNT_AND_READ_SHA = hashlib.sha1(COUNT_AND_READ.encode()).hexdigest()


class LocalWindows:
    """Fixed windows counted in this process: the limiter's fallback while Redis refuses writes."""

    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def incr(self, kind: str, who: str, window: int, cost: int) -> int:
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            count = self._counts.get((kind, who), 0) + cost
            self._counts[(kind, who)] = count
            return count


@dataclass(frozen=True)
class Windows:
    """A request's windows to count in: its subjects (kind, id) with a limit, their keys, and
    each one's limit over a window."""

    now: float
    subjects: list[tuple[str, str]]
    keys: list[str]
    limits: list[float]
    cost: int = 1
    expiry: int = 2 * WINDOW_S


class RateLimiter:
    def __init__(self, client: redis.Redis, token_rate_per_s: float, account_rate_per_s: float):
        self._redis = client
        self._limits = {"t": token_rate_per_s, "a": account_rate_per_s}
        self._local = LocalWindows()
        self._full = StateLog(log)
        self._refused: dict[tuple[str, str], int] = {}  # subjects refused in this process, and in which window

    def hit(self, account_id: str, token_id: str | None = None, *, also_get: Sequence[str] = (), cost: int = 1) -> list[object]:
        """Count one request (``cost``: as that many, for a request that runs several FHE
        evaluations, such as a key warm-up on several nodes); RateLimited if it is over a
        limit. ``also_get``: keys read in the same round trip (the guard's change counters),
        whose values are returned in order."""
        subjects = self._subjects(account_id, token_id)
        if not subjects:
            return list(self._redis.mget(also_get)) if also_get else []
        now = time.time()
        keys, args = self._script_args(subjects, now, also_get, cost)
        try:
            replies = self._redis.evalsha(COUNT_AND_READ_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted Redis: sent whole once (and cached)
            replies = self._redis.eval(COUNT_AND_READ, len(keys), *keys, *args)
        return self._judge(subjects, now, also_get, cost, replies)

    async def hit_async(
        self, client: aioredis.Redis, account_id: str, token_id: str | None = None, *, also_get: Sequence[str] = (), cost: int = 1
    ) -> list[object]:
        """:meth:`hit` on an asyncio client of the same Redis: the guard's, on its event loop,
        where a thread-pool hop for one round trip would cost more than the round trip."""
        subjects = self._subjects(account_id, token_id)
        if not subjects:
            return list(await client.mget(also_get)) if also_get else []
        now = time.time()
        keys, args = self._script_args(subjects, now, also_get, cost)
        try:
            replies = await client.evalsha(COUNT_AND_READ_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            replies = await client.eval(COUNT_AND_READ, len(keys), *keys, *args)
        return self._judge(subjects, now, also_get, cost, replies)

    def windows(self, account_id: str, token_id: str | None, cost: int = 1) -> Windows:
        """The windows a request counts in now (none where both limits are off), for a script
        that counts them with more (:mod:`cipherpool.gateway.admission`)."""
        now = time.time()
        subjects = self._subjects(account_id, token_id)
        keys, _ = self._script_args(subjects, now, (), cost)
        return Windows(now, subjects, keys, [self._limits[kind] * WINDOW_S for kind, _ in subjects], cost)

    def refused_now(self, account_id: str, token_id: str | None) -> bool:
        """Whether this process refused the account or the token for its rate in the current
        window (the guard then counts its requests before anything reads their bodies)."""
        window = int(time.time() // WINDOW_S)
        return any(self._refused.get(subject) == window for subject in self._subjects(account_id, token_id))

    def refuse_over(self, windows: Windows, counts: Sequence[int]) -> None:
        """RateLimited if a window's count is over its limit (remembered for the window:
        :meth:`refused_now`)."""
        window = int(windows.now // WINDOW_S)
        for subject, count in zip(windows.subjects, counts):
            kind = subject[0]
            if count > self._limits[kind] * WINDOW_S:
                if len(self._refused) >= REFUSED_MAX:
                    self._refused.clear()
                self._refused[subject] = window
                retry = max(1, math.ceil((window + 1) * WINDOW_S - windows.now))
                who = "access token" if kind == "t" else "account"
                raise RateLimited(
                    f"Too many requests for this {who} (limit {self._limits[kind]:g}/s); retry in {retry} s.",
                    retry_after_s=retry,
                )

    def _subjects(self, account_id: str, token_id: str | None) -> list[tuple[str, str]]:
        subjects = [("a", account_id)] + ([("t", token_id)] if token_id else [])
        return [(kind, who) for kind, who in subjects if self._limits[kind] > 0]

    @staticmethod
    def _script_args(
        subjects: list[tuple[str, str]], now: float, also_get: Sequence[str], cost: int
    ) -> tuple[list[str], list[int]]:
        window = int(now // WINDOW_S)
        keys = [f"{RATE_PREFIX}{kind}:{who}:{window}" for kind, who in subjects] + list(also_get)
        return keys, [cost, 2 * WINDOW_S, len(subjects)]

    def _judge(
        self, subjects: list[tuple[str, str]], now: float, also_get: Sequence[str], cost: int, replies: list[Any]
    ) -> list[object]:
        window = int(now // WINDOW_S)
        counts = self._counted(subjects, window, cost, replies[: len(subjects)])
        self.refuse_over(Windows(now, subjects, [], [], cost), counts)
        return list(replies[-1]) if also_get else []

    def _counted(self, subjects: list[tuple[str, str]], window: int, cost: int, replies: list[object]) -> list[int]:
        """The counts Redis answered; counted here instead while it refuses writes (full)."""
        refused = next((r for r in replies if isinstance(r, Exception)), None)
        if refused is None:
            self._full.up("rate limits: Redis takes writes again; counting there again (shared by every gateway)")
            return [int(r) for r in replies]  # type: ignore[call-overload]
        if not redis_full(refused):
            raise refused
        self._full.down(
            "rate limits: Redis refuses writes (full: %s); counting in this gateway process "
            "meanwhile (each gateway enforces the limits alone)",
            refused,
        )
        return [self._local.incr(kind, who, window, cost) for kind, who in subjects]
