"""A per-process LRU of *deserialized* evaluation keys, bounded in bytes.

Deserializing a bootstrapping key costs as much as a query (docs/architecture.md, 'The key cache': reusing one
``fhe.EvaluationKeys`` was 1.3-3x faster), and a used key grows to several times its
serialized size. So entries are charged ``serialized size x memory_factor`` and the least
recently used are dropped until the total fits. Counters are kept for stats and tests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    charged_bytes: int = 0
    capacity_bytes: int = 0


class KeyCache(Generic[V]):
    def __init__(self, capacity_bytes: int, memory_factor: float = 1.0, on_evict: Callable[[str, V], None] | None = None):
        self._on_evict = on_evict  # called (outside the lock) with each entry dropped to make room
        self._capacity = capacity_bytes
        self._factor = memory_factor
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity_bytes=capacity_bytes)

    def get_or_load(self, key_id: str, load: Callable[[], tuple[V, int]]) -> tuple[V, bool]:
        """The cached value for key_id, or load() -> (value, serialized size) and cache it.

        Returns (value, hit). Loading happens outside the lock so that one slow
        deserialization does not stall queries that hit the cache.
        """
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._entries.move_to_end(key_id)
                self._stats.hits += 1
                return entry[0], True
            self._stats.misses += 1
        value, size = load()
        self._insert(key_id, value, int(size * self._factor))
        return value, False

    def _insert(self, key_id: str, value: V, charge: int) -> None:
        evicted: list[tuple[str, V]] = []
        with self._lock:
            present = self._entries.get(key_id)
            if present is not None:
                if present[0] is not value:
                    evicted.append((key_id, value))  # a concurrent load won: drop this copy
            else:
                self._entries[key_id] = (value, charge)
                self._stats.charged_bytes += charge
            # Keep at least the newest entry even when it alone exceeds the bound.
            while self._stats.charged_bytes > self._capacity and len(self._entries) > 1:
                old, (dropped_value, dropped) = self._entries.popitem(last=False)
                self._stats.charged_bytes -= dropped
                self._stats.evictions += 1
                evicted.append((old, dropped_value))
        if self._on_evict is not None:
            for old, dropped_value in evicted:
                self._on_evict(old, dropped_value)

    def peek(self, key_id: str) -> V | None:
        """The cached value, without counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key_id)
            return entry[0] if entry is not None else None

    def __contains__(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._entries

    def clear(self, counters: bool = False) -> None:
        """Drop every entry; with ``counters``, the hit, miss and eviction counts too (a node
        that binds another model, maybe another account's, starts its figures anew)."""
        with self._lock:
            self._entries.clear()
            self._stats.charged_bytes = 0
            if counters:
                self._stats.hits = self._stats.misses = self._stats.evictions = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**{**self._stats.__dict__, "entries": len(self._entries)})
