"""A node's query figures, kept by a hook: per binding, and for the node's whole life apart.

A worker is a model's serving unit; a pool node serves many workers over its life (model A,
then B). Figures reported for a worker must be that binding's alone, or a node that ran eight
11-second queries of model A would report B's 6-millisecond queries as averaging half a
second. So each binding gets its own counters, started when it loads its model and dropped
when it is unbound; the node's lifetime counters go on beside them and are reported under
their own label.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from cipherpool.api.schemas import Figures
from cipherpool.errors import CipherpoolError
from cipherpool.workers.hooks import BindingEvent, Hook, QueryEvent


@dataclass
class Counters:
    since: float = field(default_factory=time.time)
    queries_succeeded: int = 0
    queries_refused: int = 0
    queries_failed: int = 0
    queries_requeued: int = 0
    model_loads: int = 0
    key_cache_hits: int = 0
    key_cache_misses: int = 0
    compute_s_total: float = 0.0
    queue_wait_s_total: float = 0.0
    last_compute_s: float | None = None

    def figures(self) -> Figures:
        """What the API reports: counts and averages."""
        done = self.queries_succeeded
        return Figures(
            since=self.since,
            queries_succeeded=done,
            queries_refused=self.queries_refused,
            queries_failed=self.queries_failed,
            queries_requeued=self.queries_requeued,
            model_loads=self.model_loads,
            key_cache_hits=self.key_cache_hits,
            key_cache_misses=self.key_cache_misses,
            average_compute_s=self.compute_s_total / done if done else None,
            average_queue_wait_s=self.queue_wait_s_total / done if done else None,
            last_compute_s=self.last_compute_s,
        )


class NodeStats(Hook):
    """Counts every moment of the query and binding life, per binding and for the node."""

    def __init__(self) -> None:
        self.lifetime = Counters()
        self._bindings: dict[str, Counters] = {}
        self._lock = threading.Lock()

    def _count(self, worker_id: str | None, **add: float) -> None:
        with self._lock:
            targets = [self.lifetime]
            if worker_id is not None:
                targets.append(self._bindings.setdefault(worker_id, Counters()))
            for counters in targets:
                for name, amount in add.items():
                    setattr(counters, name, getattr(counters, name) + amount)

    def model_loaded(self, binding: BindingEvent, *, seconds: float) -> None:
        with self._lock:
            self._bindings[binding.worker_id] = Counters()  # a new binding starts from zero
        self._count(binding.worker_id, model_loads=1)

    def binding_unbound(self, binding: BindingEvent) -> None:
        with self._lock:
            self._bindings.pop(binding.worker_id, None)

    def binding_load_failed(self, binding: BindingEvent, reason: str) -> None:
        with self._lock:
            self._bindings.pop(binding.worker_id, None)

    def key_loaded(self, query: QueryEvent, *, hit: bool, seconds: float) -> None:
        self._count(query.worker_id, **({"key_cache_hits": 1} if hit else {"key_cache_misses": 1}))

    def query_computed(self, query: QueryEvent) -> None:
        compute = query.timings.get("compute_s", 0.0)
        self._count(
            query.worker_id,
            queries_succeeded=1,
            compute_s_total=compute,
            queue_wait_s_total=query.timings.get("queue_wait_s", 0.0),
        )
        with self._lock:
            self.lifetime.last_compute_s = compute
            if query.worker_id in self._bindings:
                self._bindings[query.worker_id].last_compute_s = compute

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        self._count(query.worker_id, queries_refused=1)

    def query_failed(self, query: QueryEvent, error: BaseException) -> None:
        self._count(query.worker_id, queries_failed=1)

    def query_requeued(self, query: QueryEvent) -> None:
        self._count(query.worker_id, queries_requeued=1)

    def of_binding(self, worker_id: str) -> Figures:
        with self._lock:
            return self._bindings.get(worker_id, Counters()).figures()

    def of_node(self) -> Figures:
        with self._lock:
            return self.lifetime.figures()
