"""The gateway's short-lived lookup cache, refreshed ahead of its expiry while it is in use.

A credential's lookup (its principal, its models' serving state, a key set's reference) is
cached for ``auth_cache_ttl_s``: that TTL bounds how long a change the gateways did not hear
of (an operator on the database alone) goes unseen, so it stays short (at most 5 s). A
client whose queries are further apart than the TTL's half found every other one expired:
on the digits model (a query each 1.1-1.5 s against a 2 s TTL) half of the requests paid
three database reads on their path (about 8 ms of latency and of gateway CPU each, measured
with ``benchmarks/gateway_cost.py`` at a TTL of 0 against 2).

So an entry that is read is loaded again **in the background**, shortly before it expires
(at :data:`REFRESH_AT` of its life, by one :class:`Refresher` thread), while requests are
answered from it. A steady client's requests then all find a live entry; an entry costs one
load per 0.9 TTL while in use, whatever the request rate, and none once idle (it expires).
The refresh runs at its own time, not on a request's: started by the request that read the
entry, its database reads held the GIL against that request and cost it 4 ms of latency.
The bound is unchanged: a value is never served past ``ttl_s`` after the load that read it
began. A background load that fails (a credential revoked meanwhile, a database outage) drops
the entry: the next request loads it itself and gets the refusal or the outage, as without a
cache.

That alone left out the clients slower than the TTL: a query each 2.1 s (digits on a slow
spell; any model that computes for longer than ``auth_cache_ttl_s``) met its entries expired
every time, never read within their life, so never refreshed: every such query paid the
database reads on its path again, and went through the thread pool for them (7.5 ms of its
15 ms outside the compute, measured on digits). So an entry stays **warm** for ``warm_s``
(``auth_cache_warm_s``) after it was last used, a load on a request's path included: each
refresh schedules the next while its entry was used within that window. A client that asks
at least once per ``warm_s`` finds its entries live whatever its pace; an idle credential
costs ``warm_s / (0.9 ttl)`` background loads after its last request, then none.

The loader is kept with the entry for that refresh, so loaders must not hold secrets: the
gateway's loaders look a credential up by its digest.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("cipherpool.gateway")
V = TypeVar("V")
CACHE_MAX_ENTRIES = 100_000
REFRESH_AT = 0.9  # of the TTL: when an entry that was read is loaded again


class Refresher:
    """One daemon thread that runs each scheduled call at its time (monotonic seconds), in
    order; started by the first call scheduled. What is scheduled after :meth:`close` is
    dropped."""

    def __init__(self, name: str = "cipherpool-refresh"):
        self._name = name
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def schedule(self, at: float, fn: Callable[[], None]) -> bool:
        """Run ``fn`` at ``at``; False (nothing scheduled) once closed."""
        with self._wake:
            if self._closed:
                return False
            heapq.heappush(self._due, (at, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._wake.notify()
        return True

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._due.clear()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                if self._closed:
                    return
                _, _, fn = heapq.heappop(self._due)
            try:
                fn()
            except Exception:  # noqa: BLE001 - a refresh handles its own failure; this thread must live on
                log.exception("a background refresh failed")


@dataclass
class _Entry(Generic[V]):
    loaded_at: float  # when the load that read it began (its life counts from there)
    value: V
    load: Callable[[], V]
    used_at: float  # when a request last used it (a load on its path included)
    refreshing: bool = field(default=False)


class TtlCache(Generic[V]):
    """A thread-safe map whose entries live ``ttl_s`` seconds, refreshed ahead (see the
    module) by ``refresher`` when one is given, and kept so for ``warm_s`` after their last
    use; cleared whole when full."""

    def __init__(self, ttl_s: float, refresher: Refresher | None = None, *, warm_s: float = 0.0):
        self.ttl_s = ttl_s
        self.warm_s = warm_s
        self._refresher = refresher
        self._entries: dict[object, _Entry[V]] = {}
        self._lock = threading.Lock()
        self._epoch = 0  # moved by clear(): a value loaded before a clear is not stored after it

    def get_or_load(self, key: object, load: Callable[[], V]) -> V:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            if entry is not None:
                return entry.value
            epoch = self._epoch
        value = load()
        self._store(key, _Entry(now, value, load, used_at=now), epoch)
        return value

    @property
    def epoch(self) -> int:
        """Moved by every :meth:`clear`: read before a load whose value is :meth:`put` after."""
        return self._epoch

    def put(self, key: object, value: V, load: Callable[[], V], *, loaded_at: float, epoch: int) -> None:
        """Store what another load read on the way (at ``loaded_at``, with the cache at
        ``epoch``), to be refreshed by ``load``; a newer entry, or a clear since, wins."""
        self._store(key, _Entry(loaded_at, value, load, used_at=loaded_at), epoch)

    def holds(self, key: object) -> bool:
        """Whether a live entry is cached for ``key`` (nothing would be loaded for it now)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and time.monotonic() - entry.loaded_at < self.ttl_s

    def peek(self, key: object) -> V | None:
        """The live entry cached for ``key``, or None: never loads on the caller's thread (for
        the event loop, where a load, a database read, must not run)."""
        with self._lock:
            entry = self._live(key, time.monotonic())
            return None if entry is None else entry.value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._epoch += 1

    def _live(self, key: object, now: float) -> _Entry[V] | None:
        """The entry if it is within its TTL (under the lock); being read, it is scheduled to
        be loaded again before it expires, once."""
        entry = self._entries.get(key)
        if entry is None or now - entry.loaded_at >= self.ttl_s:
            return None
        entry.used_at = max(entry.used_at, now)
        self._schedule(key, entry)
        return entry

    def _schedule(self, key: object, entry: _Entry[V]) -> None:
        """Load ``entry`` again at :data:`REFRESH_AT` of its life, once (under the lock)."""
        if self._refresher is not None and not entry.refreshing:
            epoch = self._epoch
            at = entry.loaded_at + self.ttl_s * REFRESH_AT
            entry.refreshing = self._refresher.schedule(at, lambda: self._reload(key, entry, epoch))

    def _reload(self, key: object, old: _Entry[V], epoch: int) -> None:
        with self._lock:
            if self._entries.get(key) is not old or epoch != self._epoch:
                return  # loaded again on a request's path, or dropped: nothing to refresh
        started = time.monotonic()
        try:
            value = old.load()
        except Exception as exc:  # noqa: BLE001 - the next request loads it itself, and gets what this got
            log.debug("a cached lookup could not be refreshed (%s): dropped", type(exc).__name__)
            with self._lock:
                if self._entries.get(key) is old:
                    del self._entries[key]
            return
        self._store(key, _Entry(started, value, old.load, used_at=old.used_at), epoch)

    def _store(self, key: object, entry: _Entry[V], epoch: int) -> None:
        """Keep ``entry`` unless a change was announced since its load began, or the entry held
        now was read later than it (a slow load never puts an older state back). Kept, and
        used within ``warm_s``, its refresh is scheduled at once (see the module)."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if epoch != self._epoch:  # a change was announced while we read: maybe stale
                return
            current = self._entries.get(key)
            if current is not None and current.loaded_at > entry.loaded_at:
                return
            if len(self._entries) >= CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = entry
            if time.monotonic() - entry.used_at < self.warm_s:
                self._schedule(key, entry)
