"""Per-token and per-account request rates, counted in Redis so that several gateways share
them: fixed one-second windows (INCR + EXPIRE in one round trip). Over the rate the answer is
HTTP 429 with ``Retry-After``; 0 disables a limit.

The client is the store's, so a round trip on a connection that died (a Redis restart) is
sent again once on a new one (:data:`cipherpool.store.STALE_RETRIES`): a restart costs no
request. Should Redis die after counting but before answering, the retry counts that request
twice in its window, which errs on the safe side of a rate."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import redis

from cipherpool.errors import RateLimited
from cipherpool.names import RATE_PREFIX

WINDOW_S = 1


class RateLimiter:
    def __init__(self, client: redis.Redis, token_rate_per_s: float, account_rate_per_s: float):
        self._redis = client
        self._limits = {"t": token_rate_per_s, "a": account_rate_per_s}

    def hit(self, account_id: str, token_id: str | None = None, *, also_get: Sequence[str] = ()) -> list[object]:
        """Count one request; RateLimited if it is over a limit. ``also_get``: keys read in the
        same round trip (the guard's change counters), whose values are returned in order."""
        subjects = [("a", account_id)] + ([("t", token_id)] if token_id else [])
        subjects = [(kind, who) for kind, who in subjects if self._limits[kind] > 0]
        if not subjects:
            return list(self._redis.mget(also_get)) if also_get else []
        now = time.time()
        window = int(now // WINDOW_S)
        pipe = self._redis.pipeline(transaction=False)
        for kind, who in subjects:
            key = f"{RATE_PREFIX}{kind}:{who}:{window}"
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_S)
        if also_get:
            pipe.mget(also_get)
        replies = pipe.execute()
        counts = replies[:2 * len(subjects):2]
        for (kind, _), count in zip(subjects, counts):
            if count > self._limits[kind] * WINDOW_S:
                retry = max(1, math.ceil((window + 1) * WINDOW_S - now))
                who = "access token" if kind == "t" else "account"
                raise RateLimited(
                    f"Too many requests for this {who} (limit {self._limits[kind]:g}/s); retry in {retry} s.",
                    retry_after_s=retry,
                )
        return list(replies[-1]) if also_get else []
