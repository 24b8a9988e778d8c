"""Requests the gateway refused, by error code: for the operator platform-wide, for each
provider per model, and in each model's event log.

A *refusal* is a typed answer given for a reason on the caller's side, one of :data:`REASONS`
(:func:`reason_of`): ``auth`` (a missing, unknown, revoked, expired or wrong credential, a
token not assigned to the model), ``quota`` (a token's query quota, key-set caps), ``rate``
(the request rate, or too many failed authentications from an address), ``no_worker`` (no
worker serves the model), ``credits`` (the provider's balance), ``invalid_input`` (a body
or parameter that cannot be read or evaluated, an oversize body) and ``other`` (another 409:
an inactive model, keys made for another version). Not refusals: 404s (a scan of unknown
paths would count), the platform's own failures, and a node's typed refusal relayed with a
query's result (the node counted it: ``cipherpool_queries_total{outcome="refused"}``).

Every gateway buffers its refusals and writes them every ``FLUSH_S`` in one round trip
(:mod:`cipherpool.gateway.refusals`), to Redis, so every gateway's count is in one place:

* ``cipherpool:refusals:all``: ``{code: n}``, every refusal of the platform, those that name
  no model or tenant too (a failed authentication: nobody is known yet);
* per model, the ``r:<code>`` fields of the model's timing hashes (:mod:`.timings`): in each
  minute's, so a provider's window reads them with its query times, and all-time;
* ``cipherpool:refusals:a:<account id>``: ``{code: n}``, refusals of a known tenant that name
  none of its models (an API key's rate, a request of a token with several models that named
  none);
* ``cipherpool:refusals:pending:<model id>``: what the model's next ``refusals`` event will
  report (the counts and since when). Whichever gateway claims
  ``cipherpool:refusals:event:<model id>`` (``SET NX``, :data:`EVENT_EVERY_S`) takes the counts
  and records the event: at most one such event per model and minute, with every refusal in
  one of them.

Label cardinality: codes are a fixed set (:mod:`cipherpool.errors`), and a model only has the
codes it was refused with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cipherpool.errors import (
    AuthError,
    CipherpoolError,
    Conflict,
    InsufficientCredits,
    InvalidInput,
    KeyQuotaExceeded,
    ModelUnavailable,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    TooManyAlerts,
    TooManyKeys,
    from_wire,
)
from cipherpool.monitoring import timings
from cipherpool.names import REFUSALS_PREFIX

if TYPE_CHECKING:  # in annotations only: `cipherpool worker stats`, a client, reads by_reason() from here
    from redis import Redis

REASONS = ("auth", "quota", "rate", "no_worker", "credits", "invalid_input", "other")
# First match wins: RateLimited and QuotaExceeded are LimitExceeded, NoWorkerUp and
# InsufficientCredits are Conflicts, PayloadTooLarge is no InvalidInput.
_BY_CLASS: tuple[tuple[type[CipherpoolError] | tuple[type[CipherpoolError], ...], str], ...] = (
    (RateLimited, "rate"),
    ((QuotaExceeded, TooManyKeys, KeyQuotaExceeded, TooManyAlerts), "quota"),
    (AuthError, "auth"),
    (ModelUnavailable, "no_worker"),
    (InsufficientCredits, "credits"),
    ((InvalidInput, PayloadTooLarge), "invalid_input"),
    (Conflict, "other"),
)
PLATFORM_KEY = REFUSALS_PREFIX + "all"
EVENT_EVERY_S = 60  # at most one "refusals" event per model this often
PENDING_KEEP_S = 7 * 24 * 3600  # counts no gateway reported (every gateway gone) expire after this
SINCE = "@since"  # the pending hash's field: when its first refusal was counted (epoch seconds)


def reason_of(error: CipherpoolError) -> str | None:
    """The refusal's reason (one of :data:`REASONS`), or None: not a refusal."""
    for classes, reason in _BY_CLASS:
        if isinstance(error, classes):
            return reason
    return None


def reason_of_code(code: str) -> str:
    """The reason of an error code as it was counted (``other`` for a code no longer known)."""
    return reason_of(from_wire({"code": code})) or "other"


def by_reason(counts: Mapping[str, int]) -> dict[str, int]:
    """Counts by code, added up by reason (in the order of :data:`REASONS`)."""
    summed = {reason: 0 for reason in REASONS}
    for code, n in counts.items():
        summed[reason_of_code(code)] += n
    return {reason: n for reason, n in summed.items() if n}


def account_key(account_id: str) -> str:
    return f"{REFUSALS_PREFIX}a:{account_id}"


def pending_key(model_id: str) -> str:
    return f"{REFUSALS_PREFIX}pending:{model_id}"


def event_key(model_id: str) -> str:
    return f"{REFUSALS_PREFIX}event:{model_id}"


@dataclass(frozen=True)
class Refusal:
    """What one refusal is counted under: its code, and whom it is known to concern. A model
    implies its account; ``account_id`` alone: the tenant is known, not the model; neither:
    counted platform-wide only."""

    code: str
    model_id: str | None = None
    account_id: str | None = None


def write(redis: Redis, counts: Mapping[Refusal, int], at: float) -> None:
    """Add refusals counted by a gateway (``at``: when; the minute they are filed under), in
    one round trip."""
    minute_of = math.floor(at / timings.MINUTE_S)
    with redis.pipeline(transaction=False) as pipe:
        for refusal, n in counts.items():
            pipe.hincrby(PLATFORM_KEY, refusal.code, n)
            field = timings.REFUSAL_FIELD + refusal.code
            if refusal.model_id is not None:
                minute = timings.minute_key(refusal.model_id, minute_of)
                pipe.hincrby(minute, field, n)
                pipe.expire(minute, timings.KEEP_MINUTES_S)
                pipe.hincrby(timings.total_key(refusal.model_id), field, n)
                pending = pending_key(refusal.model_id)
                pipe.hincrby(pending, refusal.code, n)
                pipe.hsetnx(pending, SINCE, repr(at))
                pipe.expire(pending, PENDING_KEEP_S)
            elif refusal.account_id is not None:
                pipe.hincrby(account_key(refusal.account_id), refusal.code, n)
        pipe.execute()


def _counts(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items() if not k.decode().startswith("@")}


def platform(redis: Redis) -> dict[str, int]:
    """Every refusal of the platform, by code, all-time."""
    return _counts(redis.hgetall(PLATFORM_KEY))  # type: ignore[arg-type]


def accounts(redis: Redis, account_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per account, its refusals that name none of its models, by code, all-time (one round trip)."""
    ids = list(account_ids)
    with redis.pipeline(transaction=False) as pipe:
        for account_id in ids:
            pipe.hgetall(account_key(account_id))
        replies = pipe.execute()
    return {account_id: _counts(raw) for account_id, raw in zip(ids, replies) if raw}


@dataclass(frozen=True)
class Pending:
    """What a model's ``refusals`` event reports: counts by code since ``since``."""

    model_id: str
    since: float
    counts: dict[str, int]

    def message(self, now: float) -> str:
        total = sum(self.counts.values())
        since = datetime.fromtimestamp(self.since, UTC).strftime("%H:%M:%S UTC")
        codes = ", ".join(f"{n} {code} ({reason_of_code(code)})" for code, n in sorted(self.counts.items(), key=lambda c: -c[1]))
        plural = "request" if total == 1 else "requests"
        return f"The gateways refused {total} {plural} in {max(1, round(now - self.since))} s (since {since}): {codes}."


def claim(redis: Redis, model_ids: Iterable[str], every_s: int = EVENT_EVERY_S) -> tuple[set[str], list[Pending]]:
    """Claim the next ``refusals`` event of each model whose last one is ``every_s`` old or
    more, and take its pending counts. Returns the models claimed (whatever they held: a
    gateway stops asking for them) and the events to record (those with counts)."""
    ids = sorted(set(model_ids))
    if not ids:
        return set(), []
    with redis.pipeline(transaction=False) as pipe:
        for model_id in ids:
            pipe.set(event_key(model_id), "1", nx=True, ex=every_s)
        won = [model_id for model_id, ok in zip(ids, pipe.execute()) if ok]
    if not won:
        return set(), []
    with redis.pipeline(transaction=True) as pipe:  # taken and cleared at once: a count is reported once
        for model_id in won:
            pipe.hgetall(pending_key(model_id))
            pipe.delete(pending_key(model_id))
        replies = pipe.execute()[::2]
    found, idle = [], []
    for model_id, raw in zip(won, replies):
        counts = _counts(raw)
        if counts:
            since = raw.get(SINCE.encode())
            found.append(Pending(model_id, float(since) if since else 0.0, counts))
        else:  # another gateway reported them: no event now, so none is held back by this claim
            idle.append(event_key(model_id))
    if idle:
        redis.delete(*idle)
    return set(won), found
