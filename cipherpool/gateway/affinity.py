"""The gateway's key-affinity routing: which node's queue a query goes to, and its figures.

Each gateway process routes with a :class:`cipherpool.affinity.Router` of its own, over the
model's up nodes as its cached grant has them (refreshed whenever a worker starts or stops:
:mod:`cipherpool.announce`). The decision costs no round trip; a query is held against its
node until this process hears its answer (:func:`release`), so a busy node is passed over for
the next one in rank, then for any of the model's workers. Shared nodes' queries are not
routed: a shared node loads models on demand and consumes its class's one queue.

``cipherpool_affinity_routes_total{placement}`` counts this process's decisions: ``home`` (one
of the key set's homes), ``next`` (the next node in rank, its home busy) and ``any`` (the
model's own queue: every node in rank busy). The nodes count where each query arrived from in
the model's figures (``worker stats``, ``/metrics``, Flower): :mod:`cipherpool.monitoring.timings`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from cipherpool.affinity import Choice, Router, replicas_for
from cipherpool.config.settings import Settings
from cipherpool.services.queries import ModelGrant


def router_for(settings: Settings) -> Router | None:
    """This process's router, or None with key affinity off."""
    if not settings.key_affinity:
        return None
    return Router(bound=settings.affinity_bound, tries=2, hold_s=settings.affinity_hold_s)


def route(
    router: Router | None, settings: Settings, query_id: str, key_id: str, model: ModelGrant, shared: bool
) -> Choice | None:
    """Where the query goes: a node's affinity queue (its key set's home, or the next node in
    rank), or the model's own queue (a choice of no node, or None: not routed)."""
    if router is None or shared or not model.nodes:
        return None
    names = [name for name, _ in model.nodes]
    active = router.active(model.model_id, key_id)
    homes = homes_for(settings, len(names), active)
    return router.route(query_id, key_id, names, homes, dict(model.nodes), scope=model.model_id)


def homes_for(settings: Settings, nodes: int, active_key_sets: int) -> int:
    """How many nodes in rank a key set may use: as many as the nodes' caches have room for
    among the model's active key sets (:func:`cipherpool.affinity.replicas_for`, each node
    holding ``affinity_keys_per_node``), at least ``affinity_homes``. Two key sets on four
    nodes use all four; eight use one home each."""
    return max(settings.affinity_homes, replicas_for(nodes, settings.affinity_keys_per_node, active_key_sets))


def homes(router: Router | None, settings: Settings, model_id: str, key_id: str, nodes: list[str]) -> list[str]:
    """The nodes a key set's queries go to first (what its warm-up warms): all of ``nodes``
    with key affinity off."""
    if router is None:
        return nodes
    active = router.active(model_id, key_id)
    return router.homes_of(model_id, key_id, nodes, homes_for(settings, len(nodes), active))


class RouterCollector:
    """This process's routing decisions, for ``GET /metrics``."""

    def __init__(self, router: Router):
        self._router = router

    def collect(self) -> Iterable[Metric]:
        r = self._router
        family = CounterMetricFamily(
            "cipherpool_affinity_routes",
            "Queries this gateway process routed by key set: to a home node, to the next node in rank "
            "(the home busy past the bound), or to any of the model's workers.",
            labels=("placement",),
        )
        next_in_rank = r.fallbacks - r.to_any
        family.add_metric(["home"], r.routed - r.fallbacks)
        family.add_metric(["next"], next_in_rank)
        family.add_metric(["any"], r.to_any)
        yield family
