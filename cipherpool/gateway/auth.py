"""Bearer credentials to principals, with a short-lived cache.

An API key (``cpk_…``) authenticates a provider account; an access token (``cpt_…``) an end
user's grant on one model. Lookups hit the database once per credential and
``auth_cache_ttl_s`` (at most 5 s), so a query costs no database round trip, and a revoked
token, a disabled key or a deactivated model takes effect within that time (at once on the
gateway that made the change, which drops its cache).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cipherpool.credentials import API_KEY_PREFIX, TOKEN_PREFIX, digest
from cipherpool.errors import InvalidApiKey, InvalidToken, WrongCredential
from cipherpool.services.accounts import authenticate as authenticate_api_key
from cipherpool.services.queries import TokenGrant, grant_for_value, key_blob
from cipherpool.workers.context import PlatformContext

V = TypeVar("V")
MAX_BEARER_CHARS = 256
CACHE_MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class AccountPrincipal:
    account_id: str
    name: str


Principal = AccountPrincipal | TokenGrant


class TtlCache(Generic[V]):
    """A thread-safe map whose entries live ``ttl_s`` seconds; cleared whole when full."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[object, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get_or_load(self, key: object, load: Callable[[], V]) -> V:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                return entry[1]
        value = load()
        if self.ttl_s > 0:
            with self._lock:
                if len(self._entries) >= CACHE_MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key] = (now + self.ttl_s, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def bearer(header: str | None) -> str:
    """The credential of an ``Authorization: Bearer …`` header."""
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_BEARER_CHARS:
        raise InvalidApiKey(
            "Missing or malformed credentials: send `Authorization: Bearer <API key or access token>`."
        )
    return value


class Authenticator:
    def __init__(self, ctx: PlatformContext):
        self.ctx = ctx
        self._principals: TtlCache[Principal] = TtlCache(ctx.settings.auth_cache_ttl_s)
        self._keys: TtlCache[str] = TtlCache(ctx.settings.auth_cache_ttl_s)

    def principal(self, credential: str) -> Principal:
        if credential.startswith(API_KEY_PREFIX):
            return self._principals.get_or_load(digest(credential), lambda: self._account(credential))
        if credential.startswith(TOKEN_PREFIX):
            return self._principals.get_or_load(digest(credential), lambda: self._grant(credential))
        raise InvalidToken("Unknown kind of credential: pass a cpk_… API key or a cpt_… access token.")

    def key_blob(self, grant: TokenGrant, key_id: str) -> str:
        def load() -> str:
            with self.ctx.session() as session:
                return key_blob(session, grant, key_id)

        return self._keys.get_or_load((grant.token_id, key_id), load)

    def forget(self) -> None:
        """Drop every cached answer (after a change made through this gateway)."""
        self._principals.clear()
        self._keys.clear()

    def _account(self, api_key: str) -> AccountPrincipal:
        with self.ctx.session() as session:
            account = authenticate_api_key(session, api_key)
            return AccountPrincipal(account.id, account.name)

    def _grant(self, token: str) -> TokenGrant:
        with self.ctx.session() as session:
            return grant_for_value(session, token)


def require_account(principal: Principal | None) -> AccountPrincipal:
    if isinstance(principal, AccountPrincipal):
        return principal
    raise WrongCredential("This endpoint is for providers: authenticate with the account's cpk_… API key.")


def require_grant(principal: Principal | None) -> TokenGrant:
    if isinstance(principal, TokenGrant):
        return principal
    raise WrongCredential("This endpoint is for end users: authenticate with a cpt_… access token.")
