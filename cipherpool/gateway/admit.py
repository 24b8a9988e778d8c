"""A request's credential authenticated and its rate counted: the guard's steps 1 and 2.

The guard (:mod:`cipherpool.gateway.guard`) makes them for every request; a small query's
admission (:mod:`cipherpool.gateway.admission`) makes them itself when the guard left its count
to it and the query then goes another way. Both use these, and neither imports the other.

Each count reads the change counters in the same round trip (``AUTH_GENERATION_KEY``,
``SERVING_GENERATION_KEY``): a credential counter that moved since the principal was read from
the cache means authenticating again; a serving counter that moved means loading the token's
serving state again. "Since" is against the counters as this gateway had last read them
*before* it read the cache (``seen``), not as it has them now: another request may have
observed the change meanwhile, so that :meth:`~cipherpool.gateway.auth.Authenticator.observe`
reports nothing new, while the principal in hand was read before the change.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from cipherpool.errors import AuthError
from cipherpool.gateway.auth import AccountPrincipal, Principal, bearer
from cipherpool.gateway.state import GatewayState
from cipherpool.names import AUTH_GENERATION_KEY, SERVING_GENERATION_KEY

COUNTERS = (AUTH_GENERATION_KEY, SERVING_GENERATION_KEY)
Seen = tuple[bytes | None, bytes | None]  # the change counters (credential, serving) as read


def as_counter(value: object) -> bytes | None:
    """A change counter as read (a missing key: None)."""
    return value if isinstance(value, bytes) else None


def authenticate_and_count(
    gw: GatewayState, authorization: str | None, source: str, state: dict[str, Any] | None = None
) -> Principal:
    """Authenticate (cached), count the rate and read the change counters in one round trip;
    if the credential counter moved, the cache was stale: authenticate again. A token's grant
    then gets which of its models have a worker up now (cached apart, dropped when the serving
    counter moves). The principal is in ``state`` as soon as it is known, so that a refusal
    after authentication (its rate) counts for it. On a thread: it may read the database.

    A credential that is not cached costs a lookup: a source over its failed authentications
    is refused before it (one Redis read), and every failure is counted."""
    try:
        if not gw.auth.cached(authorization):
            gw.throttle.check(source)
        credential = bearer(authorization)
        seen = gw.auth.generations()
        principal = gw.auth.principal(credential)
        if state is not None:
            state["principal"] = principal
        token_id = None if isinstance(principal, AccountPrincipal) else principal.token_id
        credentials, serving = gw.limiter.hit(principal.account_id, token_id, also_get=COUNTERS)
        if gw.auth.observe(credentials, serving) or as_counter(credentials) != seen[0]:
            principal = gw.auth.principal(credential)
    except AuthError:
        gw.throttle.failed(source)
        raise
    return principal if isinstance(principal, AccountPrincipal) else gw.auth.with_serving(principal)


def authenticate_again(gw: GatewayState, credential: str, source: str) -> Principal:
    """The end of a count that found the credential counter moved (a lookup, on a thread)."""
    try:
        principal = gw.auth.principal(credential)
    except AuthError:
        gw.throttle.failed(source)
        raise
    return principal if isinstance(principal, AccountPrincipal) else gw.auth.with_serving(principal)


async def count_cached(
    gw: GatewayState, client: aioredis.Redis, credential: str, source: str, principal: Principal, seen: Seen
) -> Principal:
    """The count of a request whose ``principal`` came from the cache, on the event loop
    through ``client`` (the result waiter's asyncio client: one round trip, where a thread-pool
    hop would cost more). ``seen``: the change counters as read before the cache was. The
    principal to go on with: authenticated again after a credential change (a thread-pool
    hop), its serving state loaded again after a serving change."""
    token_id = None if isinstance(principal, AccountPrincipal) else principal.token_id
    credentials, serving = await gw.limiter.hit_async(client, principal.account_id, token_id, also_get=COUNTERS)
    return await after_count(gw, credential, source, principal, seen, (as_counter(credentials), as_counter(serving)))


async def after_count(gw: GatewayState, credential: str, source: str, principal: Principal, seen: Seen, now: Seen) -> Principal:
    """What a count's read of the change counters (``now``) means for ``principal``, read from
    the cache after ``seen``: the principal to go on with (see the module)."""
    if gw.auth.observe(*now) or now[0] != seen[0]:  # a credential change: authenticate again
        return await run_in_threadpool(authenticate_again, gw, credential, source)
    if isinstance(principal, AccountPrincipal):
        return principal
    served = gw.auth.cached_serving(principal)  # dropped by a serving change, whoever observed it first
    return served if served is not None else await run_in_threadpool(gw.auth.with_serving, principal)
