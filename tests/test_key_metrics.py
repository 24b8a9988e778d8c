"""Key-cache figures (issue 27): hits, misses and key-load seconds per model and worker, resident
key bytes per node, as the node hook records them and `worker stats`, `/metrics` and Flower's
Models page show them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from cipherpool.api.schemas import CurrentFigures, ModelStats, WorkerTimings
from cipherpool.cli import statsview
from cipherpool.fhe.keycache import CacheStats
from cipherpool.monitoring import timings
from cipherpool.monitoring.exporter import query_families
from cipherpool.monitoring.flower_figures import live_queries, model_row
from cipherpool.workers import node
from cipherpool.workers.hooks import BindingEvent, QueryEvent
from cipherpool.workers.timings import QueryTimings
from tests.helpers import own_redis

NODE = "pool-1@host"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "keymetrics") as url:
        yield url


@pytest.fixture
def redis(redis_url: str) -> Any:
    from redis import Redis

    client = Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def resident() -> Iterator[SimpleNamespace]:
    """A node runtime whose key cache holds ``charged`` bytes (what the hook reads)."""
    state = SimpleNamespace(charged=0)
    cache = SimpleNamespace(stats=lambda: CacheStats(charged_bytes=state.charged))
    node.install_runtime(SimpleNamespace(name=NODE, key_cache=cache))  # type: ignore[arg-type]
    yield state
    node.uninstall_runtime()


def query(model_id: str, worker: str) -> QueryEvent:
    return QueryEvent(NODE, uuid.uuid4().hex, BindingEvent(NODE, worker, model_id, "m"), model_id=model_id)


def record(redis: Any, resident: SimpleNamespace, model_id: str) -> QueryTimings:
    hook = QueryTimings(lambda: redis)
    resident.charged = 100
    hook.key_loaded(query(model_id, "w1"), hit=False, seconds=2.0)
    resident.charged = 300
    hook.key_loaded(query(model_id, "w1"), hit=False, seconds=1.0)
    for _ in range(6):
        hook.key_loaded(query(model_id, "w1"), hit=True, seconds=0.0)
    hook.key_loaded(query(model_id, "w2"), hit=True, seconds=0.0)
    return hook


def test_hits_misses_load_seconds_and_resident_bytes_are_recorded(redis: Any, resident: SimpleNamespace) -> None:
    model = uuid.uuid4().hex[:16]
    hook = record(redis, resident, model)
    found = timings.read(redis, model, 300)
    window = found.window_figures()
    assert (window.key_cache_hits, window.key_cache_misses) == (7, 2)
    assert window.key_cache_hit_ratio == pytest.approx(7 / 9)
    assert window.average_key_load_s == pytest.approx(1.5)  # misses only
    w1 = found.window_figures("w1")
    assert (w1.key_cache_hits, w1.key_cache_misses, w1.key_cache_hit_ratio) == (6, 2, 0.75)
    assert found.all_time_figures().key_cache_hits == 7
    assert found.key_bytes == {NODE: 300}  # a gauge: the last report, not a sum
    assert window.queries == 0  # a key lookup is not a computed query

    hook.binding_unbound(BindingEvent(NODE, "w1", model, "m"))  # the node dropped the model's keys
    assert timings.read(redis, model, 300).key_bytes == {}


def test_a_gauge_removed_never_recreates_a_forgotten_model(redis: Any) -> None:
    model = uuid.uuid4().hex[:16]
    QueryTimings(lambda: redis).binding_unbound(BindingEvent(NODE, "w1", model, "m"))
    assert not redis.exists(timings.total_key(model))


def _stats(found: timings.ModelTimings) -> ModelStats:
    current = CurrentFigures(
        queries=0, average_query_s=None, average_compute_s=None, average_queue_wait_s=None, latest_query_s=None, latest_at=None
    )
    worker = WorkerTimings(
        worker_id="w1",
        node=NODE,
        status="up",
        window=found.window_figures("w1"),
        all_time=found.all_time_figures("w1"),
        current=current,
        key_bytes=found.key_bytes.get(NODE),
    )
    return ModelStats(
        model="digits",
        model_id=found.model_id,
        status="active",
        at=time.time(),
        window_s=300,
        span_s=330.0,
        queue_depth=0,
        workers_by_status={"up": 1},
        window=found.window_figures(),
        all_time=found.all_time_figures(),
        current=current,
        workers=[worker],
    )


def test_worker_stats_flower_and_metrics_show_them(redis: Any, resident: SimpleNamespace) -> None:
    model = uuid.uuid4().hex[:16]
    record(redis, resident, model)
    stats = _stats(timings.read(redis, model, 300))

    rows = statsview.rows([stats])
    assert set(rows[0]) == set(statsview.COLUMNS)
    assert (rows[0]["key_hit"], rows[0]["key_load"], rows[0]["keys"]) == ("77.8%", "1.50s", "300B")
    assert (rows[1]["key_hit"], rows[1]["keys"]) == ("75.0%", "300B")
    assert statsview.size(34_500_000 * 6) == "197.4MiB"

    row = model_row("acme", stats, live_queries("x", [], time.time(), 60.0), {NODE: True})
    assert row.key_cache_hit_ratio == pytest.approx(7 / 9)
    assert (row.key_load_s, row.key_bytes, row.workers[0].key_bytes) == (1.5, 300, 300)

    found = {f.name: f for f in query_families(redis, [("acme", SimpleNamespace(id=model, account_id="a1", name="digits"))])}  # type: ignore[list-item]
    lookups = {s.labels["outcome"]: s.value for s in found["cipherpool_key_cache_lookups"].samples if s.name.endswith("_total")}
    assert lookups == {"hit": 7, "miss": 2}
    (load,) = [s for s in found["cipherpool_key_load_seconds"].samples if s.name.endswith("_total")]
    assert load.value == pytest.approx(3.0)
    (gauge,) = found["cipherpool_key_cache_resident_bytes"].samples
    assert (gauge.labels["node"], gauge.labels["model"], gauge.value) == (NODE, "digits", 300)


def routed_query(model_id: str, worker: str, routed: bool | None) -> QueryEvent:
    event = query(model_id, worker)
    event.routed = routed
    event.timings.update(queue_wait_s=0.01, compute_s=0.1)
    return event


def test_affinity_routes_and_fallbacks_show_in_worker_stats_flower_and_metrics(redis: Any, resident: SimpleNamespace) -> None:
    model = uuid.uuid4().hex[:16]
    hook = QueryTimings(lambda: redis)
    for routed in (True, True, True, False, None):  # None: a shared node's query, or affinity off
        hook.query_computed(routed_query(model, "w1", routed))
    found = timings.read(redis, model, 300)
    window = found.window_figures()
    assert (window.queries, window.affinity_routed, window.affinity_fallbacks) == (5, 3, 1)
    assert window.affinity_fallback_ratio == pytest.approx(0.25)
    stats = _stats(found)
    assert statsview.rows([stats])[0]["fallback"] == "25.0%"
    row = model_row("acme", stats, live_queries("x", [], time.time(), 60.0), {NODE: True})
    assert row.affinity_fallback_ratio == pytest.approx(0.25)
    found_metrics = {
        f.name: f for f in query_families(redis, [("acme", SimpleNamespace(id=model, account_id="a1", name="digits"))])
    }  # type: ignore[list-item]
    routes = {
        s.labels["route"]: s.value for s in found_metrics["cipherpool_affinity_queries"].samples if s.name.endswith("_total")
    }
    assert routes == {"home": 3, "fallback": 1}


def test_a_node_tells_its_affinity_queue_from_the_models_queue() -> None:
    from cipherpool.names import affinity_queue, affinity_routing_key, model_queue, query_routing_key, shared_queue
    from cipherpool.workers.query import Delivery, routed

    runtime = SimpleNamespace(name=NODE, host_class="cpu")
    on, off = (SimpleNamespace(settings=SimpleNamespace(key_affinity=flag)) for flag in (True, False))

    def came(ctx: Any, key: str, placement: str | None = None) -> bool | None:
        return routed(ctx, runtime, Delivery("q", key, None, placement), "m1")  # type: ignore[arg-type]

    # Celery publishes through the default exchange (the queue's name as the routing key); a
    # message moved or sent again by beat comes through the query exchange (the routing key).
    for mine in (affinity_queue("cpu", "m1", NODE), affinity_routing_key("cpu", "m1", NODE)):
        assert came(on, mine) is True and came(on, mine, "home") is True
        assert came(on, mine, "next") is False  # its home was busy: a fallback
    for models in (model_queue("cpu", "m1"), query_routing_key("cpu", "m1")):
        assert came(on, models) is False and came(on, models, "home") is False  # moved off its node
        assert came(off, models) is None
    assert came(on, shared_queue("cpu")) is None
    assert came(on, affinity_queue("cpu", "m1", "other@h")) is None
