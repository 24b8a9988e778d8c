"""The state of one pool node process: its binding, loaded model and key cache.

A node serves at most one model. Binding loads the model's ``FHEModelServer`` once, in this
process (never in a parent that forks later: docs/architecture.md, 'Why the threads pool'), then starts consuming the
model's queue; unbinding stops consuming first, so queries still queued wait for another node.
Nodes run Celery's ``threads`` pool (see docs/architecture.md, 'Why the threads pool'), so all parallel
executions share the one loaded model and the one key cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cipherpool.api.schemas import BlobCacheOut, KeyCacheOut, WorkerStats
from cipherpool.blobs import DiskCache
from cipherpool.fhe.evaluator import Evaluator
from cipherpool.fhe.keycache import KeyCache
from cipherpool.workers.afteranswer import AfterAnswer
from cipherpool.workers.hooks import BindingEvent, Hook, Hooks
from cipherpool.workers.stats import NodeStats

if TYPE_CHECKING:
    from cipherpool.workers.shared import SharedModels

log = logging.getLogger("cipherpool.node")


@dataclass(frozen=True)
class Binding:
    """What a node serves: one worker of one model, with the model's serving version
    (``evaluator``, ``version``) and, during a rollout or its grace period, other versions
    (``others``). A version is in here only once fully loaded."""

    worker_id: str
    model_id: str
    model_name: str
    queue: str
    evaluator: Evaluator
    node: str = ""
    workdir: Path | None = None
    bound_at: float = field(default_factory=time.time)
    version: int = 0
    others: Mapping[int, Evaluator] = field(default_factory=dict)
    consuming: bool = False  # consumes the model's queue (False while loading, and on standby)

    @property
    def event(self) -> BindingEvent:
        return BindingEvent(self.node, self.worker_id, self.model_id, self.model_name)

    @property
    def versions(self) -> set[int]:
        return {self.version, *self.others}

    def evaluator_for(self, version: int) -> Evaluator | None:
        """The loaded evaluator of a model version (0: the serving one); None if not held."""
        if version in (0, self.version):
            return self.evaluator
        return self.others.get(version)

    def with_version(self, version: int, evaluator: Evaluator) -> Binding:
        return replace(self, others={**self.others, version: evaluator})

    def keeping(self, versions: set[int], serving: int) -> Binding:
        """Only ``versions`` kept (those held), ``serving`` as the serving one if held."""
        every = {**self.others, self.version: self.evaluator}
        primary = serving if serving in every else self.version
        return replace(
            self,
            version=primary,
            evaluator=every[primary],
            others={v: e for v, e in every.items() if v in versions and v != primary},
        )


class NodeRuntime:
    """One pool node process: its profile, its binding, its key cache and its hooks.

    ``stats`` (a :class:`NodeStats` hook) is always the first hook; more come from
    ``CIPHERPOOL_NODE_HOOKS`` or :meth:`Hooks.add`."""

    def __init__(
        self,
        name: str,
        *,
        host_class: str,
        concurrency: int,
        threads: int | None,
        key_cache_bytes: int,
        key_memory_factor: float,
        evaluator_factory: Callable[[bytes, Path], Evaluator],
        hooks: Iterable[Hook] = (),
        profile: str = "default",
        labels: Mapping[str, str] | None = None,
        shared: bool = False,
    ):
        self.name = name
        self.evaluator_factory = evaluator_factory
        self.profile = profile
        self.labels = dict(labels or {})
        self.shared = shared
        self.shared_models: SharedModels | None = None  # a shared node's on-demand models (signals sets it)
        self.host_class = host_class
        self.concurrency = concurrency
        self.threads = threads
        self.key_cache: KeyCache[Any] = KeyCache(key_cache_bytes, key_memory_factor)
        # The disk cache in front of the blob store (signals attaches it to the store too); None: off.
        self.blob_cache: DiskCache | None = None
        # Writes a query queues for after its answer is stored (signals attaches it); None: at once.
        self.after_answer: AfterAnswer | None = None
        self.stats = NodeStats()
        self.hooks = Hooks([self.stats, *hooks])
        self._binding: Binding | None = None
        self._lock = threading.Lock()
        self.bind_lock = threading.RLock()  # one bind/unbind/standby change at a time (bind applies standby)

    @property
    def binding(self) -> Binding | None:
        return self._binding

    def refusal(self, hardware: str, selector: Mapping[str, str]) -> str | None:
        """Why this node must not serve a model of class ``hardware`` asking for ``selector``
        labels, or None. The node checks for itself, whatever the message that asked it."""
        if hardware != self.host_class:
            return f"it is a {self.host_class} node and the model needs a {hardware} node"
        missing = {k: v for k, v in selector.items() if self.labels.get(k) != v}
        if missing:
            return "it lacks the labels " + ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
        return None

    def set_binding(self, binding: Binding | None) -> None:
        with self._lock:
            previous, self._binding = self._binding, binding
        if previous is not None and (binding is None or binding.model_id != previous.model_id):
            # Keys of the old model are useless now, and its figures are its account's alone.
            self.key_cache.clear(counters=True)

    def update_binding(self, worker_id: str, change: Callable[[Binding], Binding]) -> Binding | None:
        """Apply ``change`` to the binding if it is still ``worker_id``'s (atomically)."""
        with self._lock:
            if self._binding is None or self._binding.worker_id != worker_id:
                return None
            self._binding = change(self._binding)
            return self._binding

    def load_evaluator(self, binding: BindingEvent, server_zip: bytes, workdir: Path) -> Evaluator:
        started = time.monotonic()
        evaluator = self.evaluator_factory(server_zip, workdir)
        self.hooks.model_loaded(binding, seconds=time.monotonic() - started)
        return evaluator

    def report(self) -> WorkerStats:
        """The live figures of this node's current worker: the binding's own counts at the top
        level, the node's lifetime counts apart."""
        binding = self._binding
        cache = self.key_cache.stats()
        own = self.stats.of_binding(binding.worker_id) if binding else self.stats.of_binding("")
        return WorkerStats(
            **own.model_dump(),
            node=self.name,
            host_class=self.host_class,
            concurrency=self.concurrency,
            threads=self.threads,
            model_id=binding.model_id if binding else None,
            model=binding.model_name if binding else None,
            worker_id=binding.worker_id if binding else None,
            versions=sorted(binding.versions) if binding else [],
            bound_for_s=time.time() - binding.bound_at if binding else None,
            node_lifetime=self.stats.of_node(),
            key_cache=KeyCacheOut(
                entries=cache.entries,
                charged_bytes=cache.charged_bytes,
                capacity_bytes=cache.capacity_bytes,
                evictions=cache.evictions,
            ),
            blob_cache=BlobCacheOut(**self.blob_cache.figures().as_dict()) if self.blob_cache else None,
        )


_runtime: NodeRuntime | None = None


def install_runtime(runtime: NodeRuntime) -> NodeRuntime:
    global _runtime
    _runtime = runtime
    return runtime


def uninstall_runtime() -> None:
    global _runtime
    _runtime = None


def current_runtime() -> NodeRuntime | None:
    """This process's pool-node state; None in a control worker."""
    return _runtime
