"""The state of one pool node process: its binding, loaded model and key cache.

A node serves at most one model. Binding loads the model's ``FHEModelServer`` once, in this
process (never in a parent that forks later: DESIGN.md §6), then starts consuming the
model's queue; unbinding stops consuming first, so queries still queued wait for another node.
Nodes run Celery's ``threads`` pool (see README, "Why the threads pool"), so all parallel
executions share the one loaded model and the one key cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cipherpool.fhe.evaluator import Evaluator
from cipherpool.fhe.keycache import KeyCache

log = logging.getLogger("cipherpool.node")


@dataclass(frozen=True)
class Binding:
    worker_id: str
    model_id: str
    model_name: str
    queue: str
    evaluator: Evaluator
    workdir: Path | None = None
    bound_at: float = field(default_factory=time.time)


@dataclass
class QueryCounters:
    succeeded: int = 0
    refused: int = 0
    model_loads: int = 0  # FHEModelServer loads: once per bind, never per query
    compute_s_total: float = 0.0
    last_compute_s: float | None = None


class NodeRuntime:
    def __init__(self, name: str, *, host_class: str, concurrency: int, threads: int | None,
                 key_cache_bytes: int, key_memory_factor: float,
                 evaluator_factory: Callable[[bytes, Path], Evaluator]):
        self.name = name
        self.evaluator_factory = evaluator_factory
        self.host_class = host_class
        self.concurrency = concurrency
        self.threads = threads
        self.key_cache: KeyCache[Any] = KeyCache(key_cache_bytes, key_memory_factor)
        self.counters = QueryCounters()
        self._binding: Binding | None = None
        self._lock = threading.Lock()
        self.bind_lock = threading.Lock()  # one bind/unbind at a time

    @property
    def binding(self) -> Binding | None:
        return self._binding

    def set_binding(self, binding: Binding | None) -> None:
        with self._lock:
            previous, self._binding = self._binding, binding
        if previous is not None and (binding is None or binding.model_id != previous.model_id):
            self.key_cache.clear()  # keys of the old model are useless now

    def load_evaluator(self, server_zip: bytes, workdir: Path) -> Evaluator:
        evaluator = self.evaluator_factory(server_zip, workdir)
        with self._lock:
            self.counters.model_loads += 1
        return evaluator

    def record(self, *, ok: bool, compute_s: float | None = None) -> None:
        with self._lock:
            if ok:
                self.counters.succeeded += 1
                if compute_s is not None:
                    self.counters.compute_s_total += compute_s
                    self.counters.last_compute_s = compute_s
            else:
                self.counters.refused += 1

    def stats(self) -> dict[str, Any]:
        binding = self._binding
        cache = self.key_cache.stats()
        c = self.counters
        return {
            "node": self.name,
            "host_class": self.host_class,
            "concurrency": self.concurrency,
            "threads": self.threads,
            "model_id": binding.model_id if binding else None,
            "model": binding.model_name if binding else None,
            "worker_id": binding.worker_id if binding else None,
            "bound_for_s": time.time() - binding.bound_at if binding else None,
            "model_loads": c.model_loads,
            "queries_succeeded": c.succeeded,
            "queries_refused": c.refused,
            "average_compute_s": c.compute_s_total / c.succeeded if c.succeeded else None,
            "last_compute_s": c.last_compute_s,
            "key_cache": cache.__dict__,
        }


_runtime: NodeRuntime | None = None


def install_runtime(runtime: NodeRuntime | None) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> NodeRuntime | None:
    """This process's pool-node state; None in a control worker."""
    return _runtime
