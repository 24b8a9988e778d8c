"""What every platform process (control worker, pool node, beat) shares: settings, the
database, the blob store (its backend and the platform's Redis) and its counters. Clients
never build one: they have no database credentials."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property, lru_cache

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlmodel import Session

from cipherpool.config.settings import Settings, get_settings
from cipherpool.db import session_scope
from cipherpool.store import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, BlobStore, redis_client


@dataclass
class PlatformContext:
    settings: Settings

    @cached_property
    def db_url(self) -> str:
        return self.settings.effective_database_url()

    @cached_property
    def store(self) -> BlobStore:
        """The blob store the settings name (``blob_store``), with the platform's Redis beside it."""
        return BlobStore.from_settings(self.settings)

    @cached_property
    def counters(self) -> redis.Redis:
        """The store's Redis for increments that must not count twice (shared-node metering,
        which is billed): no command is sent again, since a retry after a lost reply would add
        twice. A failed increment is the hook's to log; the store's own client retries once."""
        return redis.Redis.from_url(
            self.settings.effective_store_url(),
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )

    @cached_property
    def broker_redis(self) -> redis.Redis:
        """The broker's Redis, for beat's look into its queues (:mod:`cipherpool.scheduler.redeliver`)."""
        return redis_client(self.settings.effective_broker_url().replace("redis+socket://", "unix://", 1))

    @cached_property
    def result_redis(self) -> redis.Redis:
        """The result backend's Redis: whether a query started (its result key exists)."""
        return redis_client(self.settings.effective_result_backend())

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.db_url)


@lru_cache(maxsize=1)
def platform() -> PlatformContext:
    return PlatformContext(get_settings())
