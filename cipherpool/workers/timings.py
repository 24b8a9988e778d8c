"""The node hook that records every query's times per model and worker
(:mod:`cipherpool.monitoring.timings` keeps the layout in Redis and reads them)."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable

from redis import Redis

from cipherpool.errors import CipherpoolError, PlatformError
from cipherpool.monitoring.timings import KEY_BYTES_FIELD, SHARED, US, Record, Sample, bucket_index, write
from cipherpool.workers.hooks import BindingEvent, Hook, QueryEvent
from cipherpool.workers.node import current_runtime

log = logging.getLogger("cipherpool.monitoring")
FLUSH_S = 0.5  # a node writes its buffered query times this often (seconds)


class QueryTimings(Hook):
    """The node hook that records every query's times (see the module's docstring).

    Writes leave the query's path: a query only appends its figures to a buffer, and a
    thread writes the buffer every ``flush_s`` seconds in one pipelined round trip, with the
    additions to one field summed first (measured in ``benchmarks/hook_overhead.py``: writing
    per query cost 0.5 ms of a query's time on loopback Redis). A node killed outright loses
    at most ``flush_s`` of figures, never an answer. Nodes pass :data:`FLUSH_S`; the default,
    None, writes at once (for tests and tools that read right after).
    A failed write is logged and dropped: figures are never worth a query."""

    def __init__(self, redis: Callable[[], Redis], clock: Callable[[], float] = time.time, flush_s: float | None = None):
        self._redis = redis
        self._clock = clock
        self._flush_s = flush_s
        self._pending: list[Record] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _model(query: QueryEvent) -> str | None:
        return query.model_id or (query.binding.model_id if query.binding else None)

    def _record(
        self,
        query: QueryEvent,
        model_id: str | None,
        sample: Sample | None = None,
        histogram: dict[str, int] | None = None,
        gauges: dict[str, int | None] | None = None,
        **amounts: int,
    ) -> None:
        if model_id is None:
            return
        worker = query.worker_id or SHARED
        adds = {name: value for key, value in amounts.items() for name in (key, f"w:{worker}:{key}")}
        self._push(Record(self._clock(), model_id, adds, sample, histogram, query.version, gauges))

    def _push(self, record: Record) -> None:
        if self._flush_s is None:
            self._write([record])
            return
        with self._lock:
            self._pending.append(record)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cipherpool-timings", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _run(self) -> None:
        assert self._flush_s is not None
        while True:
            time.sleep(self._flush_s)
            self.flush()

    def flush(self) -> None:
        """Write what is buffered now (the thread does it every ``flush_s``)."""
        with self._lock:
            records, self._pending = self._pending, []
        if records:
            try:
                self._write(records)
            except Exception:  # noqa: BLE001 - figures are never worth a node
                log.exception("could not record %d queries' times", len(records))

    def _write(self, records: list[Record]) -> None:
        write(self._redis(), records)

    def key_loaded(self, query: QueryEvent, *, hit: bool, seconds: float) -> None:
        """A key-cache hit, or a miss and the seconds it spent loading the key; and the bytes
        of keys resident in this node's cache now (a gauge per node, ``kb:<node>``)."""
        runtime = current_runtime()
        gauges: dict[str, int | None] | None = (
            {f"{KEY_BYTES_FIELD}{runtime.name}": runtime.key_cache.stats().charged_bytes} if runtime else None
        )
        if hit:
            self._record(query, self._model(query), gauges=gauges, key_hits=1)
        else:
            self._record(query, self._model(query), gauges=gauges, key_misses=1, key_load_us=round(max(0.0, seconds) * US))

    def binding_unbound(self, binding: BindingEvent) -> None:
        """The node dropped the model and its keys: its resident bytes are no longer the model's."""
        self._push(Record(self._clock(), binding.model_id, {}, gauges={f"{KEY_BYTES_FIELD}{binding.node}": None}))

    def query_computed(self, query: QueryEvent) -> None:
        wait = max(0.0, query.timings.get("queue_wait_s", 0.0))
        compute = max(0.0, query.timings.get("compute_s", 0.0))
        wait_us, compute_us = round(wait * US), round(compute * US)
        sample = Sample(self._clock(), query.worker_id or SHARED, wait, compute)
        histogram = {
            f"queue_wait:{bucket_index(wait)}": 1,
            "queue_wait:sum_us": wait_us,
            f"compute:{bucket_index(compute)}": 1,
            "compute:sum_us": compute_us,
        }
        amounts = {"queries": 1, "wait_us": wait_us, "compute_us": compute_us}
        if query.routed is not None:
            amounts["routed_home" if query.routed else "routed_any"] = 1
        self._record(query, self._model(query), sample, histogram, None, **amounts)

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        """The caller's error (a ciphertext that cannot be evaluated, a wrong key) is a
        refusal, apart from the model's error rate; a typed failure of the platform's own (the
        store full or out of reach) is a failure."""
        if isinstance(error, PlatformError):
            self._record(query, self._model(query), failed=1)
        else:
            self._record(query, self._model(query), refused=1)

    def query_failed(self, query: QueryEvent, error: BaseException) -> None:
        self._record(query, self._model(query), failed=1)
