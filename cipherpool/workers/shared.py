"""A shared pool node: models loaded on demand, least recently used dropped first.

A node whose profile says ``shared = true`` holds no dedicated worker. It consumes its
class's shared queue (``cipherpool.shared.<class>``), where the gateway sends queries of
models that allow shared nodes when no dedicated worker serves them (or when the caller asks
for ``mode=shared``). The first query of a model version loads it (a database lookup and the
server artifact from the store, once); later ones find it loaded. Loaded models are bounded
by memory (the profile's ``model_cache``), each charged what its load added to the process's
resident memory. Providers pay such queries by execution time, not runtime:
:class:`ExecutionMeter` records it per account and model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from cipherpool.billing.charging import record_execution
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Model, ModelStatus
from cipherpool.errors import ModelUnavailable
from cipherpool.fhe.evaluator import Evaluator
from cipherpool.fhe.keycache import KeyCache
from cipherpool.names import SHARED_EXECUTION_PREFIX
from cipherpool.services.models import get_version
from cipherpool.services.nodes import loaded_key
from cipherpool.store import BlobKind
from cipherpool.workers.hooks import BindingEvent, Hook, QueryEvent

log = logging.getLogger("cipherpool.node")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SharedModels:
    """The models a shared node holds, by ``model id:version``, in an LRU bounded in bytes.

    ``redis``: where the node publishes what it holds (``cipherpool:shared-loaded:<node>``),
    for `cipherpool pool nodes`; best effort, a query never waits on it."""

    def __init__(
        self,
        node: str,
        host_class: str,
        capacity_bytes: int,
        workdir: Path,
        factory: Callable[[bytes, Path], Evaluator],
        measure: Callable[[], int] | None = None,
        redis: Callable[[], Redis] | None = None,
    ):
        self.node, self.host_class, self.workdir, self._factory = node, host_class, workdir, factory
        self._redis = redis
        self._measure = measure or _resident_bytes  # what a load adds to it is what the model costs
        self._cache: KeyCache[tuple[Evaluator, Path, str]] = KeyCache(capacity_bytes, 1.0, on_evict=self._drop)
        self._lock = threading.Lock()  # one load at a time: a load is compute- and memory-heavy

    def evaluator(self, ctx: PlatformContext, model_id: str, version: int) -> tuple[Evaluator, BindingEvent, int, bool]:
        """The loaded evaluator of the model's ``version`` (0: its serving one), its event for
        hooks, the version and whether it was loaded already."""
        with ctx.session() as session:  # small: the model's row, to check it may run here
            model = session.get(Model, model_id)
            if model is None or not model.shared or model.hardware != self.host_class or model.status != ModelStatus.ACTIVE:
                raise ModelUnavailable("This model may not run on a shared node now; submit the query again.")
            number = version or model.version
            name = model.name
            blob = get_version(session, model, number).server_blob

        key = f"{model_id}:{number}"

        def load() -> tuple[tuple[Evaluator, Path, str], int]:
            with self._lock:  # one load at a time, so each is charged what it alone added
                loaded = self._cache.peek(key)
                if loaded is not None:  # a concurrent first query loaded it while this one waited
                    return loaded, 0
                before = self._measure()
                workdir = Path(tempfile.mkdtemp(prefix=f"{model_id}-v{number}-", dir=self.workdir))
                started = time.monotonic()
                try:
                    evaluator = self._factory(ctx.store.get(BlobKind.SERVER_ZIP, blob), workdir)
                except BaseException:  # a refused or failed load leaves nothing behind
                    shutil.rmtree(workdir, ignore_errors=True)
                    raise
                log.info("shared node %s loaded %s v%d in %.2f s", self.node, name, number, time.monotonic() - started)
                size = max(self._measure() - before, 1)
                self._publish(lambda r: r.hset(loaded_key(self.node), key, size))
                return (evaluator, workdir, name), size

        (evaluator, _, _), hit = self._cache.get_or_load(key, load)
        return evaluator, BindingEvent(self.node, "", model_id, name), number, hit

    def loaded(self) -> int:
        return self._cache.stats().entries

    def _drop(self, key: str, entry: tuple[Evaluator, Path, str]) -> None:
        log.info("shared node %s unloads %s (least recently used)", self.node, key)
        shutil.rmtree(entry[1], ignore_errors=True)
        if self._cache.peek(key) is None:  # not a concurrent second load of a model still held
            self._publish(lambda r: r.hdel(loaded_key(self.node), key))

    def forget_published(self) -> None:
        """At start and stop: what an earlier run of this node held is not loaded now."""
        self._publish(lambda r: r.delete(loaded_key(self.node)))

    def _publish(self, write: Callable[[Redis], object]) -> None:
        if self._redis is None:
            return
        try:
            write(self._redis())
        except RedisError as exc:  # the listing is informative; the load or eviction stands
            log.warning("shared node %s could not publish its loaded models: %s", self.node, exc)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class ExecutionMeter(Hook):
    """On a shared node: each computed query, and each key warm-up's evaluation, adds its
    execution seconds (and one to the count)
    to its account's running tally per model (``cipherpool:shared-exec:<account>``, what
    `execution_tally` reads) and to its account's minute, per model and node profile, which
    billing's tick charges once the minute is over (:mod:`cipherpool.billing.charging`):
    providers pay shared nodes by computation, not runtime."""

    def __init__(self, redis: Callable[[], Redis], profile: str = "default"):
        self._redis, self.profile = redis, profile

    def query_computed(self, query: QueryEvent) -> None:
        self._meter(query)

    def key_warmed(self, query: QueryEvent) -> None:
        """A warm-up's evaluation is computation the account caused: billed as one execution."""
        self._meter(query)

    def _meter(self, query: QueryEvent) -> None:
        account = query.account_id
        if not account or not query.model_id:
            return
        compute_s = query.timings.get("compute_s", 0.0)
        redis = self._redis()
        with redis.pipeline() as pipe:
            key = SHARED_EXECUTION_PREFIX + account
            pipe.hincrbyfloat(key, f"{query.model_id}:seconds", compute_s)
            pipe.hincrby(key, f"{query.model_id}:queries", 1)
            pipe.execute()
        record_execution(redis, account, query.model_id, self.profile, compute_s, time.time())


def execution_tally(redis: Redis, account_id: str) -> dict[str, dict[str, float]]:
    """An account's shared-node execution per model: ``{model_id: {"seconds": s, "queries": n}}``."""
    raw: dict[bytes, bytes] = redis.hgetall(SHARED_EXECUTION_PREFIX + account_id)  # type: ignore[assignment]
    tally: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        model_id, _, what = field.decode().partition(":")
        tally.setdefault(model_id, {})[what] = float(value)
    return tally
