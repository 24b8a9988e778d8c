"""The platform's own Prometheus metrics, read when they are scraped (the gateway's ``/metrics``).

A custom collector rather than counters kept in the gateway, because the figures live
elsewhere: query times in Redis (written by each node's :class:`~cipherpool.workers.timings.QueryTimings` hook),
queue depths in the broker (:mod:`.depth`), workers, balances and nodes in the database. So
every gateway process exports the same figures, a restarted gateway loses nothing, and the
collector holds no state at all. It is registered in a registry of its own, never
prometheus-client's global one, so the scrape shows the platform and not whatever else in the
gateway process registered there.

One scrape costs one database session (five small reads, grouped in SQL), two Redis reads and
one passive queue declaration per model (each version's figures and the model's refusals are
fields of the same two hashes), two more Redis round trips for the refusals of the platform and
of each account, then the health view's own reads (a session for the nodes, a few Redis
reads). The families (docs/operations.md, "Monitoring"):

* ``cipherpool_query_queue_wait_seconds``, ``cipherpool_query_compute_seconds``: histograms
  per ``account``, ``model``, ``version``, all-time (the buckets of :data:`.timings.BUCKETS_S`);
* ``cipherpool_queries_total``: counter per ``account``, ``model``, ``version``, ``outcome``
  (computed, refused, failed);
* ``cipherpool_refusals_total``: counter per ``reason``, ``code``: every request a gateway
  refused (:mod:`.refusals`), platform-wide; ``cipherpool_model_refusals_total``: the same per
  ``account``, ``model`` (``model=""``: the tenant's, naming none of its models);
* ``cipherpool_queue_depth``: gauge per ``account``, ``model`` (the dedicated queue);
  ``cipherpool_shared_queue_depth``: gauge per ``host_class`` (the shared nodes' queue);
* ``cipherpool_workers``: gauge per ``account``, ``model``, ``status`` (every status, zeros too);
* ``cipherpool_account_balance_credits``: gauge per ``account``;
* ``cipherpool_nodes_online``: gauge per ``host_class``, ``shared``;
* the platform's own health (components up, beat's job ages, heartbeats, Redis memory,
  platform events): :mod:`.health_metrics`, from the view `cipherpool status` prints.

**The ``version`` label.** A query is counted under the model version it ran on when the node
recorded it (:attr:`.timings.Record.version`); what was recorded without one (before versions
were recorded) stays in a series without the label, so no query is counted twice and none is
lost: ``sum by (account, model)`` adds up to the model's figures whatever the versions. A
model with no figures at all shows its zeros without the label. Each version a model ever
served keeps its series (all-time figures), 3 + 2 x 18 of them; models have few versions, and
deleting a model drops them all (:func:`.timings.forget`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from celery import Celery
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from redis import Redis
from sqlmodel import Session, col, func, select

from cipherpool.billing.money import MICRO
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, Model, PoolNode, Worker
from cipherpool.monitoring import depth, platform_events, refusals, timings
from cipherpool.monitoring.components import read_status
from cipherpool.monitoring.health_metrics import health_families
from cipherpool.names import shared_queue
from cipherpool.services.nodes import live
from cipherpool.statuses import WorkerStatus

log = logging.getLogger("cipherpool.monitoring")
MODEL_LABELS = ("account", "account_id", "model")  # names are display names (not unique): ids tell them apart
OUTCOMES = ("computed", "refused", "failed")  # cipherpool_queries_total's outcome label, Tally fields in order
MODEL_REFUSALS = "cipherpool_model_refusals"  # filled by query_families (per model), then refusal_families (per account)


@dataclass
class Snapshot:
    """What the database says at scrape time, read in one short session."""

    models: list[tuple[str, Model]] = field(default_factory=list)  # (account name, model)
    workers: dict[str, Counter[str]] = field(default_factory=dict)  # model id -> status value -> workers
    balances: list[tuple[str, str, int]] = field(default_factory=list)  # (account name, id, micro-credits)
    nodes: dict[tuple[str, bool], int] = field(default_factory=dict)  # (host class, shared) -> online nodes

    @property
    def shared_classes(self) -> list[str]:
        """Host classes whose shared queue may hold queries: a model allows shared nodes, or
        a shared node of the class has registered."""
        return sorted({m.hardware for _, m in self.models if m.shared} | {c for c, shared in self.nodes if shared})


def read_database(session: Session, heartbeat_s: float) -> Snapshot:
    """Models with their account's name, workers counted by status, balances and nodes."""
    snap = Snapshot()
    rows = session.exec(
        select(Account.name, Model)
        .join(Model, Model.account_id == Account.id)  # type: ignore[arg-type]
        .order_by(Account.name, Model.name)
    )
    snap.models = [(account, model) for account, model in rows]
    counted = session.exec(select(Worker.model_id, Worker.status, func.count()).group_by(Worker.model_id, Worker.status))
    for model_id, status, n in counted:
        snap.workers.setdefault(model_id, Counter())[WorkerStatus(status).value] += n
    snap.balances = [
        (name, account_id, micro)
        for name, account_id, micro in session.exec(
            select(Account.name, Account.id, Account.balance_micro).order_by(Account.name)
        )
    ]
    for host_class, shared in session.exec(select(PoolNode.host_class, PoolNode.shared).distinct()):
        snap.nodes[(host_class, bool(shared))] = 0  # a class with every node offline still shows, at 0
    online = select(PoolNode.host_class, PoolNode.shared, func.count()).where(live(heartbeat_s))
    for host_class, shared, n in session.exec(online.group_by(col(PoolNode.host_class), col(PoolNode.shared))):
        snap.nodes[(host_class, bool(shared))] = n
    return snap


def _all_time(redis: Redis, model_id: str) -> tuple[timings.Tally, dict[int, timings.Tally], dict[str, int], dict[str, int]]:
    """The model's all-time tally, each version's, the gateway's refusals by code and the
    resident key bytes per node: one read of the hash that :func:`.timings.read` also reads (it
    would fetch the window's minutes and the latest queries too, which a scrape ignores)."""
    raw: dict[bytes, bytes] = redis.hgetall(timings.total_key(model_id))  # type: ignore[assignment]
    tally, _per_worker = timings.split_hash(raw)
    return tally, timings.version_tallies(raw), timings.refusal_counts(raw), timings.key_bytes(raw)


def _histogram(family: Metric, labels: dict[str, str], found: timings.Histogram) -> None:
    """A histogram's samples with these labels (HistogramMetricFamily.add_metric's, for a
    family whose series do not all carry the same labels)."""
    for le, n in found.buckets:
        family.samples.append(Sample(family.name + "_bucket", {**labels, "le": le}, n))
    family.samples.append(Sample(family.name + "_count", labels, found.count))
    family.samples.append(Sample(family.name + "_sum", labels, found.sum_s))


def _unversioned(total: timings.Tally, versions: dict[int, timings.Tally]) -> timings.Tally:
    rest = timings.Tally()
    rest.add(total)
    for tally in versions.values():
        for name in timings.TALLY_FIELDS:
            setattr(rest, name, max(0, getattr(rest, name) - getattr(tally, name)))  # a counter never < 0
    return rest


def query_families(redis: Redis, models: list[tuple[str, Model]]) -> list[Metric]:
    """Per model and version: queue wait and compute histograms, and queries by outcome
    (all-time); what was recorded without a version in series without the label."""
    wait = HistogramMetricFamily(
        "cipherpool_query_queue_wait_seconds",
        "Time a computed query waited in the broker before a node took it, all-time.",
        labels=MODEL_LABELS,
    )
    compute = HistogramMetricFamily(
        "cipherpool_query_compute_seconds",
        "Time a node spent computing a query (key, evaluation), all-time.",
        labels=MODEL_LABELS,
    )
    outcomes = CounterMetricFamily(
        "cipherpool_queries",
        "Queries nodes received, by outcome: computed, refused "
        "(a typed refusal such as a wrong key), failed (an unexpected error).",
        labels=(*MODEL_LABELS, "outcome"),
    )
    refused = CounterMetricFamily(
        MODEL_REFUSALS,
        "Requests the gateways refused for the model (model empty: for the account, naming none of its models), "
        "by reason and error code.",
        labels=(*MODEL_LABELS, "reason", "code"),
    )
    lookups = CounterMetricFamily(
        "cipherpool_key_cache_lookups",
        "Queries' evaluation-key lookups in the nodes' key caches, by outcome: hit (deserialized key "
        "reused) or miss (fetched and deserialized), all-time.",
        labels=(*MODEL_LABELS, "outcome"),
    )
    key_load = CounterMetricFamily(
        "cipherpool_key_load_seconds",
        "Seconds the nodes spent fetching and deserializing evaluation keys on key-cache misses, all-time.",
        labels=MODEL_LABELS,
    )
    routes = CounterMetricFamily(
        "cipherpool_affinity_queries",
        "Queries nodes computed with key affinity on, by the queue they came through: home (the node's "
        "affinity queue for the key set) or fallback (the model's queue), all-time.",
        labels=(*MODEL_LABELS, "route"),
    )
    resident = GaugeMetricFamily(
        "cipherpool_key_cache_resident_bytes",
        "Bytes of deserialized evaluation keys resident in a node's key cache (charged as serialized size x "
        "key_memory_factor), as the node last reported them for the model it serves.",
        labels=(*MODEL_LABELS, "node"),
    )
    try:
        for account, model in models:
            base = dict(zip(MODEL_LABELS, (account, model.account_id, model.name)))
            found = timings.histogram_sets(redis, model.id)
            series = [(base | {"version": str(v)}, hist) for v, hist in sorted(found.versions.items())]
            if not series or found.unversioned["compute"].count or found.unversioned["queue_wait"].count:
                series.append((base, found.unversioned))
            for labels, hist in series:
                _histogram(wait, labels, hist["queue_wait"])
                _histogram(compute, labels, hist["compute"])
            tally, versions, codes, resident_bytes = _all_time(redis, model.id)
            names = [account, model.account_id, model.name]
            lookups.add_metric([*names, "hit"], tally.key_hits)
            lookups.add_metric([*names, "miss"], tally.key_misses)
            key_load.add_metric(names, tally.key_load_us / timings.US)
            routes.add_metric([*names, "home"], tally.routed_home)
            routes.add_metric([*names, "fallback"], tally.routed_any)
            for node, n in sorted(resident_bytes.items()):
                resident.add_metric([*names, node], n)
            counted = [(base | {"version": str(v)}, t) for v, t in sorted(versions.items())]
            rest = _unversioned(tally, versions)
            if not counted or rest.attempts:
                counted.append((base, rest))
            for labels, t in counted:
                for outcome, n in zip(OUTCOMES, (t.queries, t.refused, t.failed)):
                    outcomes.samples.append(Sample(outcomes.name + "_total", labels | {"outcome": outcome}, n))
            for code, n in sorted(codes.items()):
                refused.add_metric([account, model.account_id, model.name, refusals.reason_of_code(code), code], n)
    except Exception:  # noqa: BLE001 - without Redis, the database's figures still come
        log.warning("metrics: could not read query times from Redis", exc_info=True)
        return []
    return [wait, compute, outcomes, refused, lookups, key_load, routes, resident]


def refusal_families(redis: Redis, snap: Snapshot, per_model: CounterMetricFamily | None) -> list[Metric]:
    """Every refusal of the platform by reason and code, and (into ``per_model``, the family
    :func:`query_families` filled) each account's that name none of its models."""
    platform = CounterMetricFamily(
        "cipherpool_refusals",
        "Requests the gateways refused, platform-wide (those that name no model or tenant too), by reason and error code.",
        labels=("reason", "code"),
    )
    try:
        for code, n in sorted(refusals.platform(redis).items()):
            platform.add_metric([refusals.reason_of_code(code), code], n)
        if per_model is not None:
            found = refusals.accounts(redis, [account_id for _, account_id, _ in snap.balances])
            for name, account_id, _ in snap.balances:
                for code, n in sorted(found.get(account_id, {}).items()):
                    per_model.add_metric([name, account_id, "", refusals.reason_of_code(code), code], n)
    except Exception:  # noqa: BLE001 - without Redis, the database's figures still come
        log.warning("metrics: could not read refusals from Redis", exc_info=True)
        return []
    return [platform]


def depth_families(app: Celery, snap: Snapshot, registry: Redis | None = None) -> list[Metric]:
    """Queries waiting in each model's queue and in each class's shared queue. If the broker
    fails, the depths read so far are kept and the rest left out: the other figures still
    come, and a missing series reads as "unknown", not as an empty queue."""
    models = GaugeMetricFamily(
        "cipherpool_queue_depth",
        "Queries waiting in the model's dedicated queue and its nodes' key-affinity queues.",
        labels=MODEL_LABELS,
    )
    shared = GaugeMetricFamily(
        "cipherpool_shared_queue_depth",
        "Queries waiting in the shared nodes' queue of a host class (every model's).",
        labels=("host_class",),
    )
    try:
        known = depth.known_affinity_queues(registry)  # once per scrape, not per model
        for account, model in snap.models:
            waiting = sum(depth.queue_depth(app, q) for q in depth.model_queues(model.hardware, model.id, known))
            models.add_metric([account, model.account_id, model.name], waiting)
        for host_class in snap.shared_classes:
            shared.add_metric([host_class], depth.queue_depth(app, shared_queue(host_class)))
    except Exception:  # noqa: BLE001 - a scrape without depths beats no scrape
        log.warning("metrics: could not read queue depths from the broker", exc_info=True)
    return [models, shared]


def database_families(snap: Snapshot) -> list[Metric]:
    """Workers by status per model, balances per account, online nodes per class."""
    workers = GaugeMetricFamily(
        "cipherpool_workers",
        "The model's workers by status (stopped and failed: the rows the database keeps).",
        labels=(*MODEL_LABELS, "status"),
    )
    for account, model in snap.models:
        counted = snap.workers.get(model.id, Counter())
        for status in WorkerStatus:
            workers.add_metric([account, model.account_id, model.name, status.value], counted[status.value])
    balance = GaugeMetricFamily(
        "cipherpool_account_balance_credits", "The account's credit balance, in credits.", labels=("account", "account_id")
    )
    for account, account_id, micro in snap.balances:
        balance.add_metric([account, account_id], micro / MICRO)
    nodes = GaugeMetricFamily(
        "cipherpool_nodes_online", "Pool nodes online (heard from within 3 heartbeats).", labels=("host_class", "shared")
    )
    for (host_class, shared), n in sorted(snap.nodes.items()):
        nodes.add_metric([host_class, str(shared).lower()], n)
    return [workers, balance, nodes]


class PlatformCollector:
    """A prometheus-client collector (``collect``) that reads everything at scrape time.

    Blocking I/O (database, Redis, broker): call it from a thread, as the gateway's route does."""

    def __init__(self, ctx: PlatformContext, app: Celery):
        self._ctx = ctx
        self._app = app

    def collect(self) -> Iterator[Metric]:
        with self._ctx.session() as session:
            snap = read_database(session, self._ctx.settings.node_heartbeat_s)
        queries = query_families(self._ctx.store.redis, snap.models)
        per_model = next((f for f in queries if isinstance(f, CounterMetricFamily) and f.name == MODEL_REFUSALS), None)
        yield from refusal_families(self._ctx.store.redis, snap, per_model)
        yield from queries
        yield from depth_families(self._app, snap, self._ctx.store.redis)
        yield from database_families(snap)
        yield from health(self._ctx)


def health(ctx: PlatformContext) -> list[Metric]:
    """The platform's own health, judged now (read_status reports, never raises, what it cannot read)."""
    status = read_status(ctx, time.time(), events=0)
    try:
        total: int | None = platform_events.recorded_total(ctx.store.redis)
    except Exception:  # noqa: BLE001 - the store's own state already says it is unreachable
        total = None
    return health_families(status, total)
