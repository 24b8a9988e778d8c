"""The node's half of a worker's log (:mod:`cipherpool.workerlog`): a hook, so the hot path
and the binding code stay as they are. It writes what a provider needs to see: loads and
their time, up, unbound, failed loads, and queries that failed or were refused (by code,
never the ciphertext). Successful queries are counted by the statistics, not logged."""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis

from cipherpool import workerlog
from cipherpool.errors import CipherpoolError
from cipherpool.workers.hooks import BindingEvent, Hook, QueryEvent


class WorkerLog(Hook):
    """Writes a bound worker's moments to its log. ``redis`` is called when a line is written
    (the node's store connection is made lazily)."""

    def __init__(self, redis: Callable[[], Redis]):
        self._redis = redis

    def _write(self, worker_id: str | None, node: str, message: str, level: str = "info") -> None:
        if worker_id:
            workerlog.write(self._redis(), worker_id, message, level=level, source=node)

    def model_loaded(self, binding: BindingEvent, *, seconds: float) -> None:
        self._write(binding.worker_id, binding.node, f"model {binding.model_name} loaded in {seconds:.2f} s")

    def binding_bound(self, binding: BindingEvent) -> None:
        self._write(binding.worker_id, binding.node, f"bound on {binding.node}")

    def binding_unbound(self, binding: BindingEvent) -> None:
        self._write(binding.worker_id, binding.node, f"unbound from {binding.node}: model unloaded, node free")

    def binding_load_failed(self, binding: BindingEvent, reason: str) -> None:
        self._write(binding.worker_id, binding.node, f"load failed: {reason}", "error")

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        self._write(query.worker_id, query.node, f"query {query.task_id} refused: {error.code}: {error.message}", "warning")

    def query_failed(self, query: QueryEvent, error: BaseException) -> None:
        self._write(query.worker_id, query.node, f"query {query.task_id} failed: {type(error).__name__}", "error")

    def query_requeued(self, query: QueryEvent) -> None:
        self._write(query.worker_id, query.node, f"query {query.task_id} handed back to the model's queue (unbound)")
