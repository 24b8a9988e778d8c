"""Bearer credentials to principals, with a short-lived cache.

An API key (``cpk_…``) authenticates a provider account; an access token (``cpt_…``) an end
user's grant on the models it is assigned to. Lookups hit the database once per credential
and ``auth_cache_ttl_s`` (at most 5 s), so a query costs no database round trip; a lookup in
use is loaded again in the background before it expires (:mod:`cipherpool.gateway.ttlcache`).

A change (a rotated key, a revoked, disabled or unassigned token, a deactivated model, a new
version) takes effect at once on every gateway: the gateway that makes it bumps a generation
counter in Redis, and every gateway compares it with its own on each request (one GET) and
drops its caches when it moved. A change made where the gateway cannot hear it (an operator
on the database alone) takes effect within the cache's TTL.

What changes as workers come and go is cached apart (:class:`ServingState`: each model's
serving version and client specs, which have a worker up or a shared node, the account's
credit), per account and set of models, under a counter of its own that every worker start,
stop, standby, resume, failure and rollout flip bumps: such a change drops that cache only,
so a provider starting and stopping workers does not make every gateway load every
credential again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cipherpool.context import PlatformContext
from cipherpool.credentials import API_KEY_PREFIX, TOKEN_PREFIX, digest
from cipherpool.errors import InvalidApiKey, InvalidToken, WrongCredential
from cipherpool.gateway.ttlcache import Refresher, TtlCache
from cipherpool.names import AUTH_GENERATION_KEY, SERVING_GENERATION_KEY
from cipherpool.outages import redis_full
from cipherpool.services.accounts import authenticate_hash
from cipherpool.services.queries import (
    KeyRef,
    ModelGrant,
    ServingState,
    TokenGrant,
    check_key,
    grant_for_hash,
    key_ref,
    serving_state,
)

log = logging.getLogger("cipherpool.gateway")
MAX_BEARER_CHARS = 256


@dataclass(frozen=True)
class AccountPrincipal:
    account_id: str
    name: str


Principal = AccountPrincipal | TokenGrant


def bearer(header: str | None) -> str:
    """The credential of an ``Authorization: Bearer …`` header."""
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_BEARER_CHARS:
        raise InvalidApiKey("Missing or malformed credentials: send `Authorization: Bearer <API key or access token>`.")
    return value


class Authenticator:
    def __init__(self, ctx: PlatformContext):
        self.ctx = ctx
        ttl, warm = ctx.settings.auth_cache_ttl_s, ctx.settings.auth_cache_warm_s
        # Lookups in use (used within `warm` seconds) are loaded again ahead of their expiry,
        # off the requests' path (cipherpool/gateway/ttlcache.py); its thread starts with the
        # first refresh.
        self._refresher = Refresher("cipherpool-auth-refresh")
        self._principals: TtlCache[Principal] = TtlCache(ttl, self._refresher, warm_s=warm)
        self._keys: TtlCache[KeyRef] = TtlCache(ttl, self._refresher, warm_s=warm)
        self._serving: TtlCache[ServingState] = TtlCache(ttl, self._refresher, warm_s=warm)
        self._generation: bytes | None = None
        self._serving_generation: bytes | None = None

    def principal(self, credential: str) -> Principal:
        if credential.startswith(API_KEY_PREFIX):
            key_hash = digest(credential)
            return self._principals.get_or_load(key_hash, lambda: self._account(key_hash))
        if credential.startswith(TOKEN_PREFIX):
            token_hash = digest(credential)
            principal = self._principals.get_or_load(token_hash, lambda: self._grant(token_hash))
            if isinstance(principal, TokenGrant):
                principal.check_unexpired()
            return principal
        raise InvalidToken("Unknown kind of credential: pass a cpk_… API key or a cpt_… access token.")

    def cached(self, authorization: str | None) -> bool:
        """Whether the credential of this ``Authorization`` header is in the cache, so that
        authenticating it costs no database lookup (a malformed header: False)."""
        try:
            credential = bearer(authorization)
        except InvalidApiKey:
            return False
        return self._principals.holds(digest(credential))

    def cached_principal(self, credential: str) -> Principal | None:
        """The principal of ``credential`` if it is cached (checked unexpired, as
        :meth:`principal` does), else None: nothing is looked up."""
        if not credential.startswith((API_KEY_PREFIX, TOKEN_PREFIX)):
            return None
        principal = self._principals.peek(digest(credential))
        if isinstance(principal, TokenGrant):
            principal.check_unexpired()
        return principal

    def cached_serving(self, grant: TokenGrant) -> TokenGrant | None:
        """:meth:`with_serving` if the grant's serving state is cached, else None (not loaded)."""
        ids = tuple(m.model_id for m in grant.models)
        if not ids:
            return grant
        state = self._serving.peek((grant.account_id, ids))
        return None if state is None else state.apply(grant)

    def key_blob(self, grant: TokenGrant, model: ModelGrant, key_id: str) -> str:
        """The evaluation-key blob of key set ``key_id``, if it is usable for ``model`` now."""

        def load() -> KeyRef:
            with self.ctx.session() as session:
                ref = key_ref(session, grant.token_id, key_id)
            if ref is None or ref.expired:  # not cached: an upload may follow at once
                return check_key(ref, model)  # type: ignore[return-value]  # raises
            return ref

        return check_key(self._keys.get_or_load((grant.token_id, key_id), load), model)

    def cached_key_blob(self, grant: TokenGrant, model: ModelGrant, key_id: str) -> str | None:
        """:meth:`key_blob` where its key reference is cached (never loads: the event loop's);
        None where it is not."""
        ref = self._keys.peek((grant.token_id, key_id))
        return None if ref is None else check_key(ref, model)

    def with_serving(self, grant: TokenGrant) -> TokenGrant:
        """The grant with its serving state as of now: each model's serving version, which
        have a worker up or a shared node, the account's credit (cached for the TTL, or until
        the serving counter moves)."""
        ids = tuple(m.model_id for m in grant.models)
        if not ids:
            return grant
        return self._serving.get_or_load((grant.account_id, ids), self._serving_loader(grant.account_id, ids)).apply(grant)

    def observe(self, generation: object, serving: object = None) -> bool:
        """The change counters as read with this request (``AUTH_GENERATION_KEY`` and
        ``SERVING_GENERATION_KEY``). A moved credential counter drops every cache and returns
        True (re-authenticate); a moved serving counter drops only what was cached of serving."""
        current = generation if isinstance(generation, bytes) else None
        serving_now = serving if isinstance(serving, bytes) else None
        if serving_now != self._serving_generation:
            self._serving.clear()
            self._serving_generation = serving_now
        if current == self._generation:
            return False
        self.forget()
        self._generation = current
        return True

    def generations(self) -> tuple[bytes | None, bytes | None]:
        """The change counters (credential, serving) as last read by :meth:`observe`."""
        return self._generation, self._serving_generation

    def sync(self) -> None:
        """:meth:`observe` with a read of its own."""
        self.observe(*self.ctx.store.redis.mget([AUTH_GENERATION_KEY, SERVING_GENERATION_KEY]))

    def changed(self) -> None:
        """A credential, grant or model changed: every gateway drops its caches. With Redis
        full (it refuses the INCR) the change, committed already, still stands: the other
        gateways see it within ``auth_cache_ttl_s``, as a change made in the database alone."""
        self.forget()
        try:
            self.ctx.store.redis.incr(AUTH_GENERATION_KEY)
        except redis.ResponseError as exc:
            if not redis_full(exc):
                raise
            log.warning("could not announce a credential change (Redis is full): other gateways see it within auth_cache_ttl_s")

    def forget(self) -> None:
        """Drop every cached answer."""
        self._principals.clear()
        self._keys.clear()
        self._serving.clear()

    def close(self) -> None:
        """Stop refreshing (a refresh under way finishes; nothing new starts)."""
        self._refresher.close()

    # The loaders take a credential's digest, never its value: they stay with the cached entry
    # for its refresh (cipherpool/gateway/ttlcache.py).
    def _account(self, key_hash: str) -> AccountPrincipal:
        with self.ctx.session() as session:
            account = authenticate_hash(session, key_hash)
            return AccountPrincipal(account.id, account.name)

    def _grant(self, token_hash: str) -> TokenGrant:
        started, epoch = time.monotonic(), self._serving.epoch
        with self.ctx.session() as session:
            grant = grant_for_hash(session, token_hash)
        # What it was loaded with is the freshest serving state: no second read for it (and the
        # serving entry's own refresh, due a moment later, finds it newer and reads nothing).
        ids = tuple(m.model_id for m in grant.models)
        loader = self._serving_loader(grant.account_id, ids)
        self._serving.put((grant.account_id, ids), ServingState.of(grant), loader, loaded_at=started, epoch=epoch)
        return grant

    def _serving_loader(self, account_id: str, ids: tuple[str, ...]) -> Callable[[], ServingState]:
        def load() -> ServingState:
            with self.ctx.session() as session:
                return serving_state(session, account_id, list(ids))

        return load


def require_account(principal: Principal | None) -> AccountPrincipal:
    if isinstance(principal, AccountPrincipal):
        return principal
    raise WrongCredential("This endpoint is for providers: authenticate with the account's cpk_… API key.")


def require_grant(principal: Principal | None) -> TokenGrant:
    if isinstance(principal, TokenGrant):
        return principal
    raise WrongCredential("This endpoint is for end users: authenticate with a cpt_… access token.")
