"""Hooks around a query's life and a binding's life on a pool node, as Dramatiq's middleware.

Statistics, metrics, billing and alerts need to see every query and every bind, but none of
them belongs in the hot path. So the hot path (:mod:`cipherpool.workers.query`) and the
binding code (:mod:`cipherpool.workers.binding`) announce what happens, once, to
:class:`Hooks`, and each concern is a :class:`Hook` subclass that overrides the moments it
cares about. Every method of :class:`Hook` is a no-op.

A query's moments, in order: ``query_received`` (decoded, before any check) →
``query_authorised`` (its envelope names this binding's model and the request's key set) →
``key_loaded`` → ``query_computed``. It may end in ``query_refused`` instead (a typed
refusal, returned to the client as a result envelope, not a Celery failure),
``query_failed`` (a bug or lost infrastructure: a Celery FAILURE) or ``query_requeued`` (the
node was unbound while the query was prefetched; another node will take it).
A key warm-up is no query: its one evaluation, when it ran, is ``key_warmed``.

A binding's: ``model_loaded`` (the evaluator is ready) → ``binding_bound``, then
``binding_unbound``; or ``binding_load_failed``.

Hooks run in the node's execution thread, in registration order, and must be quick. A hook
that raises is logged and skipped: a metrics bug must never cost a user an answer. Extra hooks
are named in ``CIPHERPOOL_NODE_HOOKS`` (``module:Class``, comma-separated) and built with no
arguments when the node starts.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from cipherpool.errors import CipherpoolError, ConfigurationError

log = logging.getLogger("cipherpool.hooks")


@dataclass(frozen=True)
class BindingEvent:
    """A binding as hooks see it: which worker (a model's serving unit) on which node."""

    node: str
    worker_id: str
    model_id: str
    model_name: str


@dataclass
class QueryEvent:
    """One query as hooks see it: ids and timings, never the ciphertext or a credential.

    ``binding`` is what the node served when the query arrived (None if nothing); the ids of
    the request are None until it was decoded. ``timings`` fills in as the query goes."""

    node: str
    task_id: str | None
    binding: BindingEvent | None
    received_at: float = field(default_factory=time.time)
    model_id: str | None = None
    key_id: str | None = None
    token_id: str | None = None
    account_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    version: int | None = None  # the model version: the one asked for once decoded, the one that ran once loaded
    # Key affinity: True if it came through this node's affinity queue of its model, False
    # through the model's own queue with affinity on (a fallback); None otherwise.
    routed: bool | None = None

    @property
    def worker_id(self) -> str | None:
        return self.binding.worker_id if self.binding else None


class Hook:
    """Subclass and override the moments you need; all of them do nothing here."""

    def query_received(self, query: QueryEvent) -> None:
        """Decoded and about to be checked; ``timings['queue_wait_s']`` is known."""

    def query_authorised(self, query: QueryEvent) -> None:
        """The ciphertext belongs to this binding's model and the request's key set."""

    def key_loaded(self, query: QueryEvent, *, hit: bool, seconds: float) -> None:
        """The deserialized evaluation key is at hand (from the cache if ``hit``)."""

    def query_computed(self, query: QueryEvent) -> None:
        """The encrypted result is ready; ``timings`` is complete."""

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        """A typed refusal (bad input, wrong key, wrong node): the node keeps serving."""

    def query_failed(self, query: QueryEvent, error: BaseException) -> None:
        """An unexpected exception: the task fails and the operator's log has the trace."""

    def query_requeued(self, query: QueryEvent) -> None:
        """Given back to its model's queue: this node stopped serving the model meanwhile."""

    def key_warmed(self, query: QueryEvent) -> None:
        """A key warm-up ran its one throwaway evaluation (not a query: no other moment is
        told); ``timings['compute_s']`` is how long it took."""

    def model_loaded(self, binding: BindingEvent, *, seconds: float) -> None:
        """The model's evaluator was loaded for this binding (once per bind, never per query)."""

    def binding_bound(self, binding: BindingEvent) -> None:
        """The node consumes the model's queue."""

    def binding_unbound(self, binding: BindingEvent) -> None:
        """The node stopped consuming and unloaded the model."""

    def binding_load_failed(self, binding: BindingEvent, reason: str) -> None:
        """The model could not be loaded; the node stays free."""


class Hooks(Hook):
    """The hooks of one node, called in order; one hook's exception never reaches the caller."""

    def __init__(self, hooks: Iterable[Hook] = ()):
        self._hooks: list[Hook] = list(hooks)

    def add(self, hook: Hook) -> Hook:
        self._hooks.append(hook)
        return hook

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def _each(self, moment: str, call: Callable[[Hook], None]) -> None:
        for hook in self._hooks:
            try:
                call(hook)
            except Exception:
                log.exception("hook %s failed in %s", type(hook).__name__, moment)

    def query_received(self, query: QueryEvent) -> None:
        self._each("query_received", lambda h: h.query_received(query))

    def query_authorised(self, query: QueryEvent) -> None:
        self._each("query_authorised", lambda h: h.query_authorised(query))

    def key_loaded(self, query: QueryEvent, *, hit: bool, seconds: float) -> None:
        self._each("key_loaded", lambda h: h.key_loaded(query, hit=hit, seconds=seconds))

    def query_computed(self, query: QueryEvent) -> None:
        self._each("query_computed", lambda h: h.query_computed(query))

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        self._each("query_refused", lambda h: h.query_refused(query, error))

    def query_failed(self, query: QueryEvent, error: BaseException) -> None:
        self._each("query_failed", lambda h: h.query_failed(query, error))

    def query_requeued(self, query: QueryEvent) -> None:
        self._each("query_requeued", lambda h: h.query_requeued(query))

    def key_warmed(self, query: QueryEvent) -> None:
        self._each("key_warmed", lambda h: h.key_warmed(query))

    def model_loaded(self, binding: BindingEvent, *, seconds: float) -> None:
        self._each("model_loaded", lambda h: h.model_loaded(binding, seconds=seconds))

    def binding_bound(self, binding: BindingEvent) -> None:
        self._each("binding_bound", lambda h: h.binding_bound(binding))

    def binding_unbound(self, binding: BindingEvent) -> None:
        self._each("binding_unbound", lambda h: h.binding_unbound(binding))

    def binding_load_failed(self, binding: BindingEvent, reason: str) -> None:
        self._each("binding_load_failed", lambda h: h.binding_load_failed(binding, reason))


def load_hook(path: str) -> Hook:
    """Build the hook named ``module:Class`` (what ``CIPHERPOOL_NODE_HOOKS`` lists)."""
    module_name, _, attr = path.strip().partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        hook = factory()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"Cannot build node hook {path!r} (expected module:Class): {exc}") from None
    if not isinstance(hook, Hook):
        raise ConfigurationError(f"Node hook {path!r} is not a cipherpool.workers.hooks.Hook.")
    return hook
