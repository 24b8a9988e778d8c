"""The gateway's Prometheus metrics (issue 10), scraped through the real app (in-process
``TestClient``, its own Redis on a free loopback port, SQLite).

Query times are recorded by the nodes' own hook (:class:`QueryTimings`) into that Redis, queries
wait in real broker queues, workers, nodes and balances are database rows; the exposition text
is parsed with prometheus-client's own parser and every figure is known exactly. Two accounts
each have a model named ``digits``: the ``account`` label tells them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cipherpool.clock import utcnow
from cipherpool.db.tables import Account, Model, PoolNode, Worker
from cipherpool.statuses import NodeStatus, WorkerStatus

TOKEN = "metrics-test-token-7d1f0c9a4b2e"  # fixed: it appears in parametrised test ids
UNKNOWN_ROUTE = {"code": "not_found", "message": "No such endpoint; see /docs."}
# (account, model) -> the (queue wait, compute) seconds of its computed queries, then refused, failed
QUERIES = {
    ("acme", "digits"): ([(0.003, 0.7), (0.2, 1.5), (40.0, 400.0)], 1, 2),
    ("zeta", "digits"): ([(0.01, 4.0)], 0, 0),
    ("acme", "cancer"): ([], 0, 0),
}


@dataclass
class World:
    client: Any
    settings: Any
    api_key: str
    model_ids: dict[tuple[str, str], str]

    def scrape(self, token: str | None = TOKEN) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.client.get("/metrics", headers=headers)


def _seed(db: str) -> tuple[str, dict[tuple[str, str], str]]:
    """Accounts, models (one shared), nodes (live, stale, offline) and workers of every kind."""
    from cipherpool.db import session_scope
    from cipherpool.services.accounts import create_account

    with session_scope(db) as session:
        acme, api_key = create_account(session, "acme", signup_grant=Decimal("12.5"))
        zeta, _ = create_account(session, "zeta", signup_grant=Decimal(0))
        models = {
            ("acme", "digits"): Model(account_id=acme.id, name="digits"),
            ("zeta", "digits"): Model(account_id=zeta.id, name="digits"),
            ("acme", "cancer"): Model(account_id=acme.id, name="cancer", shared=True),
        }
        session.add_all(models.values())
        stale = utcnow() - timedelta(hours=1)
        session.add_all(
            [
                PoolNode(name="n1@h"),
                PoolNode(name="n2@h", shared=True),
                PoolNode(name="n3@h", host_class="gpu", status=NodeStatus.OFFLINE),
                PoolNode(name="n4@h", last_seen=stale),
            ]
        )  # says online, not heard from: not counted
        session.flush()
        digits, other = models[("acme", "digits")], models[("zeta", "digits")]
        for model, node, status in [
            (digits, "n1@h", WorkerStatus.UP),
            (digits, "n1@h", WorkerStatus.STOPPED),
            (digits, "n4@h", WorkerStatus.STOPPED),
            (digits, "n4@h", WorkerStatus.FAILED),
            (other, "n4@h", WorkerStatus.LOADING),
        ]:
            session.add(Worker(account_id=model.account_id, model_id=model.id, node_name=node, status=status))
        return api_key, {key: m.id for key, m in models.items()}


def _record_queries(redis_url: str, model_ids: dict[tuple[str, str], str]) -> None:
    """As nodes record them: through the QueryTimings hook."""
    from redis import Redis

    from cipherpool.errors import KeyMismatch
    from cipherpool.workers.timings import QueryTimings

    redis = Redis.from_url(redis_url)
    hook = QueryTimings(lambda: redis)
    for key, (computed, refused, failed) in QUERIES.items():
        model_id = model_ids[key]
        for wait, compute in computed:
            hook.query_computed(_event(model_id, queue_wait_s=wait, compute_s=compute))
        for _ in range(refused):
            hook.query_refused(_event(model_id), KeyMismatch("wrong key"))
        for _ in range(failed):
            hook.query_failed(_event(model_id), RuntimeError("boom"))
    redis.close()


def _event(model_id: str, **timings: float) -> Any:
    from cipherpool.workers.hooks import QueryEvent

    return QueryEvent(node="n1@h", task_id=None, binding=None, model_id=model_id, timings=timings)


def _queue_queries(app: Any, model_ids: dict[tuple[str, str], str]) -> None:
    """Three queries wait for acme's digits, one in the shared cpu queue for acme's cancer."""
    from cipherpool.dispatch import publish_query
    from cipherpool.messages import QueryRequest

    for key, shared, n in [(("acme", "digits"), False, 3), (("acme", "cancer"), True, 1)]:
        request = QueryRequest(token_id="t", model_id=model_ids[key], key_id="k" * 32, blob_id="b", input_ref="p")
        for _ in range(n):
            publish_query(app, request, "cpu", 600, shared=shared, model_name=key[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    tmp = tmp_path_factory.mktemp("metrics")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(data_dir=tmp / "data", broker_url=url, metrics_token=TOKEN, token_rate_per_s=0, account_rate_per_s=0)
        db = s.effective_database_url()
        init_db(db)
        api_key, model_ids = _seed(db)
        _record_queries(url, model_ids)
        with TestClient(create_app(s), raise_server_exceptions=False) as client:
            _queue_queries(client.app.state.gw.celery, model_ids)
            yield World(client, s, api_key, model_ids)
        get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, name: str, **labels: str) -> dict[tuple[str, ...], float]:
    """The family's samples called ``name`` that carry ``labels``, keyed by their other labels' values."""
    found = {}
    for sample in family.samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            rest = tuple(v for k, v in sorted(sample.labels.items()) if k not in labels and k != "account_id")
            found[rest] = sample.value
    return found


@pytest.fixture(scope="module")
def scraped(world) -> dict[str, Any]:
    response = world.scrape()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return families(response.text)


def test_query_time_histograms_per_model_keep_queue_wait_and_compute_apart(scraped):
    wait, compute = scraped["cipherpool_query_queue_wait_seconds"], scraped["cipherpool_query_compute_seconds"]
    assert wait.type == compute.type == "histogram"
    acme = {"account": "acme", "model": "digits"}
    # compute 0.7, 1.5, 400 s: one by 1 s, two by 2.5 s, still two by 300 s, three in all
    buckets = samples(compute, "cipherpool_query_compute_seconds_bucket", **acme)
    assert (buckets[("0.5",)], buckets[("1.0",)], buckets[("2.5",)], buckets[("300.0",)], buckets[("+Inf",)]) == (0, 1, 2, 2, 3)
    assert samples(compute, "cipherpool_query_compute_seconds_count", **acme) == {(): 3}
    assert samples(compute, "cipherpool_query_compute_seconds_sum", **acme)[()] == pytest.approx(402.2)
    # queue wait 0.003, 0.2, 40 s
    buckets = samples(wait, "cipherpool_query_queue_wait_seconds_bucket", **acme)
    assert (buckets[("0.005",)], buckets[("0.25",)], buckets[("30.0",)], buckets[("60.0",)]) == (1, 2, 2, 3)
    assert samples(wait, "cipherpool_query_queue_wait_seconds_sum", **acme)[()] == pytest.approx(40.203)
    # the other account's model of the same name has its own series; a model never queried shows zeros
    assert samples(compute, "cipherpool_query_compute_seconds_sum", account="zeta", model="digits")[()] == pytest.approx(4.0)
    assert samples(compute, "cipherpool_query_compute_seconds_count", account="zeta", model="digits") == {(): 1}
    assert samples(wait, "cipherpool_query_queue_wait_seconds_count", account="acme", model="cancer") == {(): 0}


def test_queries_are_counted_by_outcome(scraped):
    counted = samples(scraped["cipherpool_queries"], "cipherpool_queries_total", account="acme", model="digits")
    assert counted == {("computed",): 3, ("refused",): 1, ("failed",): 2}
    assert scraped["cipherpool_queries"].type == "counter"
    assert samples(scraped["cipherpool_queries"], "cipherpool_queries_total", account="zeta")[("digits", "computed")] == 1


def test_queue_depths_are_the_broker_counts(scraped):
    depth = samples(scraped["cipherpool_queue_depth"], "cipherpool_queue_depth")
    assert depth == {("acme", "cancer"): 0, ("acme", "digits"): 3, ("zeta", "digits"): 0}
    assert samples(scraped["cipherpool_shared_queue_depth"], "cipherpool_shared_queue_depth") == {("cpu",): 1}


def test_workers_by_status_balances_and_nodes_online(scraped):
    workers = samples(scraped["cipherpool_workers"], "cipherpool_workers", account="acme", model="digits")
    assert workers == {(s.value,): {"up": 1, "stopped": 2, "failed": 1}.get(s.value, 0) for s in WorkerStatus}
    assert samples(scraped["cipherpool_workers"], "cipherpool_workers", account="zeta")[("digits", "loading")] == 1
    assert samples(scraped["cipherpool_account_balance_credits"], "cipherpool_account_balance_credits") == {
        ("acme",): 12.5,
        ("zeta",): 0.0,
    }
    nodes = samples(scraped["cipherpool_nodes_online"], "cipherpool_nodes_online")
    assert nodes == {("cpu", "false"): 1, ("cpu", "true"): 1, ("gpu", "false"): 0}


def test_figures_are_read_at_scrape_time_and_nothing_else_is_exported(world, scraped):
    from cipherpool.db import session_scope

    with session_scope(world.settings.effective_database_url()) as session:
        acme = session.get(Account, session.get(Model, world.model_ids[("acme", "digits")]).account_id)
        acme.balance_micro += 500_000
    later = families(world.scrape().text)
    balance = samples(later["cipherpool_account_balance_credits"], "cipherpool_account_balance_credits")
    assert balance[("acme",)] == 13.0
    # its own registry: neither the process's default collectors nor anything registered globally
    assert all(name.startswith("cipherpool_") for name in later), sorted(later)


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", f"bearer {TOKEN[:-1]}"]
)
def test_anything_but_the_metrics_token_is_refused_with_a_typed_401(world, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = world.client.get("/metrics", headers=headers)
    assert response.status_code == 401 and response.json()["code"] == "auth_error"
    assert "cipherpool_" not in response.text


def test_an_account_key_is_no_metrics_token(world):
    response = world.scrape(world.api_key)
    assert response.status_code == 401 and response.json()["code"] == "auth_error"


def test_the_token_is_compared_without_case_on_the_scheme(world):
    response = world.client.get("/metrics", headers={"Authorization": f"bearer  {TOKEN} "})
    assert response.status_code == 200 and "cipherpool_workers" in response.text


def test_without_a_metrics_token_the_endpoint_is_absent(world):
    from fastapi.testclient import TestClient

    from cipherpool.gateway.app import create_app

    for unset in (None, ""):
        with TestClient(create_app(world.settings.model_copy(update={"metrics_token": unset}))) as client:
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer "}):
                response = client.get("/metrics", headers=headers)
                assert (response.status_code, response.json()) == (404, UNKNOWN_ROUTE)
            # the body an unknown route gets (once past the guard's authentication)
            assert client.get("/no-such-route", headers={"Authorization": f"Bearer {world.api_key}"}).json() == UNKNOWN_ROUTE
    assert "/metrics" not in world.client.get("/openapi.json").json()["paths"]


def test_a_broker_that_fails_costs_the_depths_only(world):
    from cipherpool.monitoring.exporter import Snapshot, depth_families

    class Unreachable:
        @property
        def pool(self):
            raise ConnectionError("broker down")

    model = Model(id="m" * 16, account_id="a", name="digits", shared=True)
    depth, shared = depth_families(Unreachable(), Snapshot(models=[("acme", model)]))
    assert depth.samples == [] and shared.samples == []


def test_two_accounts_of_one_name_never_share_a_series():
    # Given two accounts that both call themselves "acme" (names are display names), each with a "digits"
    from cipherpool.monitoring.exporter import Snapshot, database_families

    ours, theirs = Model(id="1" * 16, account_id="a" * 16, name="digits"), Model(id="2" * 16, account_id="b" * 16, name="digits")
    snap = Snapshot(models=[("acme", ours), ("acme", theirs)], balances=[("acme", "a" * 16, 5_000_000), ("acme", "b" * 16, 0)])
    workers, balance, _nodes = database_families(snap)
    # Then each has its own series, told apart by the account's id
    assert {(s.labels["account_id"], s.value) for s in balance.samples} == {("a" * 16, 5.0), ("b" * 16, 0.0)}
    keys = [tuple(sorted(s.labels.items())) for s in workers.samples]
    assert len(keys) == len(set(keys)) == 2 * len(WorkerStatus)


def test_a_redis_that_fails_costs_the_query_times_only():
    from cipherpool.monitoring.exporter import query_families

    class Down:
        def hgetall(self, key):
            raise ConnectionError("redis down")

    assert query_families(Down(), [("acme", Model(id="m" * 16, account_id="a", name="digits"))]) == []
