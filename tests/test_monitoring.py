"""Query times per model and worker: what the node hook records, the arithmetic of windows,
averages, current query time, rates and histograms, and what a provider reads through the
gateway (`GET /v1/stats`, `ManagementClient.model_stats`, `cipherpool worker stats`).

Timings are recorded by the real hook into a real Redis with a fixed clock, at known
moments, so every figure below is known exactly.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from cipherpool.errors import InvalidInput
from cipherpool.monitoring import timings
from cipherpool.monitoring.timings import MINUTE_S, Sample, Tally, window_minutes
from cipherpool.workers.hooks import BindingEvent, QueryEvent
from cipherpool.workers.timings import QueryTimings
from tests.helpers import own_redis

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC, a minute boundary


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(model_id: str, worker: str | None, wait: float = 0.0, compute: float = 0.0) -> QueryEvent:
    binding = BindingEvent("node-1@test", worker, model_id, "m") if worker else None
    query = QueryEvent("node-1@test", uuid.uuid4().hex, binding, model_id=model_id)
    query.timings.update(queue_wait_s=wait, compute_s=compute)
    return query


# ---- pure arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "window_s", "minutes", "span"),
    [
        (0.0, 60, 2, 60.0),  # at a minute boundary: the last whole minute and the new one
        (30.0, 60, 2, 90.0),  # 00:00:30, 1 min: 23:59:30 falls in 23:59 -> 23:59..00:00
        (150.0, 300, 6, 330.0),  # 00:02:30, 5 min: from 23:57:00
        (59.999, 60, 2, 119.999),
        (3600.0, 3600, 61, 3600.0),  # at a boundary: exactly the hour, and the new minute
    ],
)
def test_a_window_is_the_whole_minutes_that_overlap_it(offset: float, window_s: int, minutes: int, span: float) -> None:
    found, covered = window_minutes(T0 + offset, window_s)
    assert len(found) == minutes
    assert found[-1] == int((T0 + offset) // MINUTE_S)
    assert found == list(range(found[0], found[-1] + 1))
    assert covered == pytest.approx(span)
    assert covered >= window_s  # never less than asked for


@pytest.mark.parametrize("window_s", [0, -5, 24 * 3600 + 1])
def test_a_window_out_of_bounds_is_refused(window_s: int) -> None:
    with pytest.raises(ValueError):
        window_minutes(T0, window_s)


@pytest.mark.parametrize(
    ("tally", "span", "expected"),
    [
        (Tally(), 60.0, dict(average_query_s=None, queries_per_minute=0.0, error_rate=None, refusal_rate=None)),
        (
            Tally(queries=4, wait_us=2_000_000, compute_us=6_000_000),
            120.0,
            dict(
                average_query_s=2.0,
                average_compute_s=1.5,
                average_queue_wait_s=0.5,
                queries_per_minute=2.0,
                error_rate=0.0,
                refusal_rate=0.0,
            ),
        ),
        (
            Tally(queries=6, refused=3, failed=1, wait_us=600, compute_us=6_000),
            300.0,
            dict(average_query_s=0.0011, queries_per_minute=1.2, error_rate=1 / 7, refusal_rate=0.3),
        ),  # refusals apart
        (Tally(refused=2), None, dict(average_query_s=None, queries_per_minute=None, error_rate=None, refusal_rate=1.0)),
    ],
)
def test_figures_of_a_tally(tally: Tally, span: float | None, expected: dict[str, Any]) -> None:
    found = tally.figures(span)
    for name, value in expected.items():
        assert getattr(found, name) == (pytest.approx(value) if value is not None else None), name


def test_current_is_the_average_of_the_latest_queries_newest_first() -> None:
    samples = [Sample(T0 + 9 - i, "w1" if i % 2 == 0 else "w2", 0.1 * i, 1.0 + i) for i in range(10)]
    now = timings.current(samples, 3)
    assert now.queries == 3
    assert now.average_compute_s == pytest.approx((1 + 2 + 3) / 3)
    assert now.average_queue_wait_s == pytest.approx((0 + 0.1 + 0.2) / 3)
    assert now.latest_query_s == pytest.approx(1.0) and now.latest_at == T0 + 9
    w2 = timings.current(samples, 2, worker="w2")
    assert w2.average_compute_s == pytest.approx((2 + 4) / 2)
    assert timings.current(samples, 5, worker="nobody").average_query_s is None


def test_a_sample_survives_its_encoding() -> None:
    sample = Sample(T0 + 0.123, "w1", 0.25, 1.5)
    assert Sample.decode(sample.encode()) == sample


@pytest.mark.parametrize(("seconds", "index"), [(0.0, 0), (0.005, 0), (0.0051, 1), (1.0, 7), (299.0, 14), (301.0, 15)])
def test_histogram_buckets_hold_their_bound(seconds: float, index: int) -> None:
    assert timings.bucket_index(seconds) == index


# ---- recorded in Redis -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "monitoring") as url:
        yield url


@pytest.fixture
def redis(redis_url: str) -> Any:
    from redis import Redis

    client = Redis.from_url(redis_url)
    yield client
    client.close()


def record(redis: Any, clock: Clock, model_id: str, plan: list[tuple[float, str | None, str, float, float]]) -> None:
    """``(offset from T0, worker, outcome, wait, compute)``; outcome ok, refused or failed."""
    hook = QueryTimings(lambda: redis, clock)
    for offset, worker, outcome, wait, compute in plan:
        clock.now = T0 + offset
        query = event(model_id, worker, wait, compute)
        if outcome == "ok":
            hook.query_computed(query)
        elif outcome == "refused":
            hook.query_refused(query, InvalidInput("bad ciphertext"))
        else:
            hook.query_failed(query, RuntimeError("boom"))


def test_windows_all_time_and_workers_from_recorded_queries(redis: Any) -> None:
    model = uuid.uuid4().hex[:16]
    clock = Clock()
    record(
        redis,
        clock,
        model,
        [
            (0, "w1", "ok", 1.0, 2.0),  # 00:00 -- outside a 5-minute window read at 00:10:30
            (300, "w1", "ok", 0.5, 1.0),  # 00:05 -- inside it
            (400, "w2", "ok", 0.0, 3.0),
            (420, "w2", "refused", 0, 0),
            (600, None, "ok", 0.25, 0.25),  # a shared node
            (610, "w1", "failed", 0, 0),
        ],
    )
    found = timings.read(redis, model, 330, now=T0 + 630)  # from 00:05:00 (minute of 00:05:00)
    window = found.window_figures()
    assert (window.queries, window.refused, window.failed) == (3, 1, 1)
    assert window.average_query_s == pytest.approx((1.5 + 3.0 + 0.5) / 3)
    assert window.average_queue_wait_s == pytest.approx(0.75 / 3)
    assert window.error_rate == pytest.approx(1 / 4) and window.refusal_rate == pytest.approx(1 / 5)
    assert found.span_s == pytest.approx(330.0) and window.queries_per_minute == pytest.approx(3 * 60 / 330)
    all_time = found.all_time_figures()
    assert all_time.queries == 4 and all_time.average_compute_s == pytest.approx(6.25 / 4)
    assert found.window_figures("w1").queries == 1 and found.window_figures("w1").failed == 1
    assert found.all_time_figures("w1").average_query_s == pytest.approx((3.0 + 1.5) / 2)
    assert found.window_figures("w2").refusal_rate == pytest.approx(0.5)
    assert found.window_figures(timings.SHARED).average_query_s == pytest.approx(0.5)
    assert found.workers == {"w1", "w2", timings.SHARED}
    now = found.current(2)
    assert now.queries == 2 and now.average_query_s == pytest.approx((0.5 + 3.0) / 2)
    assert found.current(5, "w1").average_query_s == pytest.approx((1.5 + 3.0) / 2)


def test_recent_queries_are_capped_and_histograms_cumulate(redis: Any) -> None:
    model = uuid.uuid4().hex[:16]
    clock = Clock()
    record(redis, clock, model, [(i * 0.1, "w1", "ok", 0.002, 0.3 if i % 2 else 2.0) for i in range(timings.KEEP_RECENT + 10)])
    found = timings.read(redis, model, 60, now=clock.now)
    assert len(found.recent) == timings.KEEP_RECENT
    assert found.window.queries == timings.KEEP_RECENT + 10
    hist = timings.histograms(redis, model)
    n = timings.KEEP_RECENT + 10
    compute = dict(hist["compute"].buckets)
    assert compute["0.25"] == 0 and compute["0.5"] == n // 2 and compute["2.5"] == n and compute["+Inf"] == n
    assert hist["compute"].sum_s == pytest.approx(n // 2 * 0.3 + n // 2 * 2.0)
    assert dict(hist["queue_wait"].buckets)["0.005"] == n
    timings.forget(redis, model)
    assert timings.read(redis, model, 60, now=clock.now).all_time.queries == 0


def test_a_node_buffers_its_writes_and_sums_them(redis: Any) -> None:
    # Given the hook as nodes run it (writes every flush_s, off the query's path)
    model = uuid.uuid4().hex[:16]
    clock = Clock(T0 + 30)
    hook = QueryTimings(lambda: redis, clock, flush_s=3600)  # the thread will not flush during the test
    # When queries are recorded, nothing is written yet
    for i in range(50):
        hook.query_computed(event(model, "w1", 0.01, 0.02 * i))
    hook.query_refused(event(model, "w1"), InvalidInput("bad"))
    assert timings.read(redis, model, 60, now=clock.now).all_time.attempts == 0
    # Then one flush writes them all, exactly, the newest query first
    hook.flush()
    found = timings.read(redis, model, 60, now=clock.now)
    assert (found.window.queries, found.window.refused) == (50, 1)
    assert found.all_time.compute_us == sum(round(0.02 * i * 1e6) for i in range(50))
    assert found.recent[0].compute_s == pytest.approx(0.98) and len(found.recent) == 50
    assert redis.ttl(timings.minute_key(model, int(clock.now // 60))) > 24 * 3600
    hook.flush()  # nothing left: no second count
    assert timings.read(redis, model, 60, now=clock.now).all_time.queries == 50


def test_a_query_that_names_no_model_is_not_counted(redis: Any) -> None:
    hook = QueryTimings(lambda: redis, Clock())
    query = QueryEvent("node-1@test", "t", None)
    hook.query_computed(query)
    hook.query_refused(query, InvalidInput("undecodable"))
    assert not redis.keys(f"{timings.TIMINGS_PREFIX}None*")


# ---- through the gateway ---------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    db: str
    redis_url: str
    settings: Any


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url: str) -> Iterator[Gateway]:
    import uvicorn

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.supervisor import free_port

    tmp = tmp_path_factory.mktemp("stats-gateway")
    s = Settings(data_dir=tmp / "data", broker_url=redis_url, token_rate_per_s=0, account_rate_per_s=0)
    db = s.effective_database_url()
    init_db(db)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", db, redis_url, s)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        get_engine(db).dispose()


@dataclass
class Provider:
    id: str
    key: str
    models: dict[str, str]


def provider(gw: Gateway, *names: str) -> Provider:
    from cipherpool.db import session_scope
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models

    with session_scope(gw.db) as session:
        account, key = accounts.create_account(session, f"stats-{uuid.uuid4().hex[:8]}")
        made = {
            name: models.deploy_model(
                session, account, name, models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11"))
            ).id
            for name in names
        }
        return Provider(account.id, key, made)


def add_worker(gw: Gateway, p: Provider, model: str, status: str = "up") -> str:
    from cipherpool.db import session_scope
    from cipherpool.db.tables import PoolNode, Worker
    from cipherpool.statuses import WorkerStatus

    node = f"node-{uuid.uuid4().hex[:6]}@test"
    with session_scope(gw.db) as session:
        session.add(PoolNode(name=node))
        session.flush()
        worker = Worker(account_id=p.id, model_id=p.models[model], node_name=node, status=WorkerStatus(status))
        session.add(worker)
        session.flush()
        return worker.id


def mc(gw: Gateway, p: Provider) -> Any:
    from cipherpool.client.management import ManagementClient

    return ManagementClient(api_key=p.key, url=gw.url)


def queue_up(gw: Gateway, model_id: str, n: int) -> None:
    """``n`` messages waiting in the model's queue, published as the gateway publishes."""
    from cipherpool.config.celery import create_app
    from cipherpool.names import model_queue

    app = create_app(gw.settings, name="stats-test")
    try:
        for _ in range(n):
            app.send_task("cipherpool.test.nothing", queue=model_queue("cpu", model_id))
    finally:
        app.close()


def test_a_provider_reads_its_models_figures(gateway: Gateway, redis: Any) -> None:
    p = provider(gateway, "fast", "slow")
    w1, w2 = add_worker(gateway, p, "fast"), add_worker(gateway, p, "fast", "standby")
    now = time.time()
    record(
        redis,
        Clock(),
        p.models["fast"],
        [(now - T0 - 5, w1, "ok", 0.1, 0.2), (now - T0 - 4, w2, "ok", 0.3, 0.4), (now - T0 - 3, w1, "refused", 0, 0)],
    )
    queue_up(gateway, p.models["fast"], 3)
    client = mc(gateway, p)
    try:
        [fast] = client.model_stats("fast", window_s=120)
        everything = client.model_stats()
    finally:
        client.close()
    assert fast.model == "fast" and fast.window_s == 120 and fast.queue_depth == 3
    assert fast.workers_by_status == {"up": 1, "standby": 1}
    assert fast.window.queries == 2 and fast.window.average_query_s == pytest.approx(0.5)
    assert fast.window.refusal_rate == pytest.approx(1 / 3)
    assert fast.current.latest_query_s == pytest.approx(0.7)
    rows = {row.worker_id: row for row in fast.workers}
    assert set(rows) == {w1, w2}
    assert rows[w1].window.average_compute_s == pytest.approx(0.2) and rows[w1].status == "up"
    assert rows[w2].current.average_query_s == pytest.approx(0.7)
    assert {m.model for m in everything} == {"fast", "slow"}
    slow = next(m for m in everything if m.model == "slow")
    assert slow.window.queries == 0 and slow.queue_depth == 0 and slow.workers == []


def test_another_provider_sees_none_of_it(gateway: Gateway) -> None:
    import httpx

    a, b = provider(gateway, "private"), provider(gateway)
    answer = httpx.get(f"{gateway.url}/v1/stats", params={"model": "private"}, headers={"Authorization": f"Bearer {b.key}"})
    assert answer.status_code == 404 and answer.json()["code"] == "model_not_found"
    assert httpx.get(f"{gateway.url}/v1/stats", headers={"Authorization": f"Bearer {b.key}"}).json() == []
    assert httpx.get(f"{gateway.url}/v1/stats").status_code == 401
    bad = httpx.get(f"{gateway.url}/v1/stats", params={"window_s": 10}, headers={"Authorization": f"Bearer {a.key}"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_input"


def test_worker_stats_prints_a_table_json_and_watches(gateway: Gateway, redis: Any) -> None:
    from cipherpool.cli import cli

    p = provider(gateway, "digits")
    w1 = add_worker(gateway, p, "digits")
    record(redis, Clock(), p.models["digits"], [(time.time() - T0 - 2, w1, "ok", 0.5, 1.25)])
    env = {"CIPHERPOOL_URL": gateway.url, "CIPHERPOOL_API_KEY": p.key}
    runner = CliRunner()
    table = runner.invoke(cli, ["worker", "stats", "--model", "digits", "--window", "10m"], env=env)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].startswith("window 10 min") and lines[1].split()[:3] == ["WHAT", "STATUS", "QUEUE"]
    model_row, worker_row = lines[2], lines[3]
    assert model_row.startswith("digits") and "1.75s" in model_row and "500ms" in model_row
    assert worker_row.strip().startswith(f"{w1}@node-") and "1.25s" in worker_row
    as_json = runner.invoke(cli, ["--json", "worker", "stats", "--model", "digits"], env=env)
    assert as_json.exit_code == 0, as_json.output
    [found] = json.loads(as_json.output)
    assert found["window"]["queries"] == 1 and found["workers"][0]["worker_id"] == w1
    watched = runner.invoke(cli, ["worker", "stats", "--watch", "--interval", "0.2", "--count", "2"], env=env)
    assert watched.exit_code == 0, watched.output
    assert watched.output.count("WHAT") == 2
