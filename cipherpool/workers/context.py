"""What every platform process (control worker, pool node, beat) shares: settings, the
database and the blob store. Clients never build one: they have no database credentials."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property, lru_cache

from sqlmodel import Session

from cipherpool.config.settings import Settings, get_settings
from cipherpool.db import session_scope
from cipherpool.store import BlobStore


@dataclass
class PlatformContext:
    settings: Settings

    @cached_property
    def db_url(self) -> str:
        return self.settings.effective_database_url()

    @cached_property
    def store(self) -> BlobStore:
        return BlobStore.from_url(self.settings.effective_store_url())

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.db_url)


@lru_cache(maxsize=1)
def platform() -> PlatformContext:
    return PlatformContext(get_settings())
