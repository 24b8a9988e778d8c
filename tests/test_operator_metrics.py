"""What operators and providers see of refused requests, HTTP traffic and model versions (issue 26).

The real gateway app in-process (``TestClient``) on its own Redis and a SQLite database:

* every refusal the gateway answers is counted by code, platform-wide, for the model it was
  for (noted from the caller's own grant, or a token's only model), or for the tenant when no
  model is known; a failed authentication counts platform-wide only; a node's refusal relayed
  with a result is not counted again. The counts reach ``/metrics`` (the operator's),
  ``GET /v1/stats`` and ``cipherpool worker stats`` (the provider's own models only), and each
  model's event log, at most one ``refusals`` event a minute;
* every request is counted and timed by route template, method and status, never by raw path;
* query figures carry a ``version`` label where the node knew the version, and add up to the
  model's figures;
* the Grafana dashboard in docs/ queries only series that the gateway or Flower exports.

Each gateway writes its counts every second; here that task is slowed to an hour and the
tests flush when they read (``World.figures``), so every count is known exactly.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cipherpool import errors
from cipherpool.messages import EncryptedInput, failed
from cipherpool.monitoring import refusals, timings
from cipherpool.names import QUERY_OWNER_PREFIX, RATE_PREFIX, RESULT_META_PREFIX, USAGE_PREFIX
from tests.helpers import value_ciphertext, versions_json, zip_bytes

METRICS_TOKEN = "metrics-" + "o" * 24
KEY_ID = "cd" * 16
QUOTA = 5
ZEROS = struct.pack("<II", 0, 4) + bytes(32)  # a well-framed message of zeros: no value concrete can evaluate
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "cipherpool.json"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@dataclass
class World:
    client: Any
    app: Any
    redis: Any
    db: str
    alice: str  # account ids
    bob: str
    a_key: str
    b_key: str
    models: dict[str, str]  # name -> id: alice's digits (a worker up), idle (none), noisy (a worker up); bob's other
    tokens: dict[str, tuple[str, str]]  # name -> (clear value, id)

    def call(self, credential: str, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**bearer(credential), **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def query(self, token: str, model: str, data: bytes | None = None, **params: Any) -> Any:
        body = EncryptedInput(self.models[model], KEY_ID, data if data is not None else value_ciphertext()).encode()
        value = self.tokens[token][0]
        return self.call(
            value, "POST", "/v1/queries", content=body, params=params, headers={"Content-Type": "application/octet-stream"}
        )

    def figures(self) -> dict[str, Any]:
        """Every refusal count, as written to Redis (what was counted is flushed first)."""
        self.app.state.gw.refusals.flush()
        return {
            "platform": refusals.platform(self.redis),
            "models": {name: timings.read(self.redis, model_id, 300).refusals_all_time for name, model_id in self.models.items()},
            "accounts": refusals.accounts(self.redis, [self.alice, self.bob]),
        }

    def scrape(self) -> dict[str, Any]:
        answer = self.call(METRICS_TOKEN, "GET", "/metrics")
        assert answer.status_code == 200, answer.text
        return {family.name: family for family in text_string_to_metric_families(answer.text)}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What changed between two :meth:`World.figures`, zeros left out."""
    changed: dict[str, Any] = {}
    for part in before:
        if part == "platform":
            moved = {c: after[part].get(c, 0) - before[part].get(c, 0) for c in after[part]}
            moved = {c: n for c, n in moved.items() if n}
        else:
            moved = {}
            for who in after[part]:
                counts = {c: after[part][who].get(c, 0) - before[part].get(who, {}).get(c, 0) for c in after[part][who]}
                counts = {c: n for c, n in counts.items() if n}
                if counts:
                    moved[who] = counts
        if moved:
            changed[part] = moved
    return changed


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    import redis
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import init_db, session_scope
    from cipherpool.db.tables import ModelStatus
    from cipherpool.fhe.deployment import Versions
    from cipherpool.gateway.app import create_app
    from cipherpool.services import accounts, models, nodes, tokens, workers
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.store import BlobKind, BlobStore

    tmp = tmp_path_factory.mktemp("operator-metrics")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(
            data_dir=tmp / "data",
            broker_url=url,
            token_rate_per_s=1000,
            account_rate_per_s=1000,
            metrics_token=METRICS_TOKEN,
            auth_failure_burst=0,
        )
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)

        def artifact(tag: str) -> models.Artifact:
            client = zip_bytes(
                {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json(), "tag.txt": tag}
            )
            server = zip_bytes({"versions.json": versions_json(), "tag.txt": tag})
            blobs = store.put(BlobKind.CLIENT_ZIP, client), store.put(BlobKind.SERVER_ZIP, server)
            return models.Artifact(blobs[0], blobs[1], len(client), len(server), Versions.installed())

        with session_scope(db) as session:
            alice, a_key = accounts.create_account(session, "alice")
            bob, b_key = accounts.create_account(session, "bob")
            made = {}
            for owner, name in [(alice, "digits"), (alice, "idle"), (alice, "noisy"), (bob, "other")]:
                made[name] = models.deploy_model(session, owner, name, artifact(name)).id
                models.set_status(session, owner, name, ModelStatus.ACTIVE)
            values = {}
            for name, assigned, quota in [("one", "digits", QUOTA), ("two", ["digits", "idle"], None), ("spent", "noisy", 0)]:
                token, value = tokens.create_token(session, alice, name, assigned, quota=quota)
                values[name] = (value, token.id)
            for i, model in enumerate(["digits", "noisy"]):
                nodes.register_node(
                    session, f"node-{i}@test", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=None, pid=i)
                )
                session.flush()
                worker = workers.start_worker(session, alice, model, s.node_heartbeat_s)
                workers.mark_running(session, worker.id, {1})
                workers.set_consuming(session, worker.id, True)
            alice_id, bob_id = alice.id, bob.id
        store.redis.close()

        app = create_app(s)
        app.state.gw.refusals.flush_s = 3600  # the tests flush when they read
        with TestClient(app, raise_server_exceptions=False) as client:
            w = World(client, app, redis.Redis.from_url(url), db, alice_id, bob_id, a_key, b_key, made, values)
            for token in ("one", "spent"):
                answer = w.call(
                    w.tokens[token][0], "PUT", f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32
                )
                assert answer.status_code == 201, answer.text
            yield w
            w.redis.close()
    finally:
        supervisor.stop_all(grace_s=5)


# ---- which refusal counts, and for whom ----------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errors.QuotaExceeded("q"), "quota"),
        (errors.TooManyKeys("k"), "quota"),
        (errors.TokenKeyQuotaExceeded("k"), "quota"),
        (errors.RateLimited("r"), "rate"),
        (errors.InvalidToken("t"), "auth"),
        (errors.TokenNotForModel("t"), "auth"),
        (errors.AccountDisabled("a"), "auth"),
        (errors.NoWorkerUp("w"), "no_worker"),
        (errors.InsufficientCredits("c"), "credits"),
        (errors.InvalidCiphertext("c"), "invalid_input"),
        (errors.BadRequest("b"), "invalid_input"),
        (errors.PayloadTooLarge("p"), "invalid_input"),
        (errors.ModelInactive("m"), "other"),
        (errors.KeysOutdated("k"), "other"),
        (errors.ModelNotFound("m"), None),
        (errors.QueryTimeout("t"), None),
        (errors.BrokerUnavailable("b"), None),
    ],
)
def test_a_refusal_is_the_callers_and_has_one_reason(error, reason):
    assert refusals.reason_of(error) == reason
    if reason is not None:
        assert refusals.reason_of_code(error.code) == reason


def test_a_spent_quota_counts_for_the_tokens_model(world):
    world.redis.hset(USAGE_PREFIX + world.tokens["one"][1], "n", QUOTA)
    try:
        before = world.figures()
        answers = [world.query("one", "digits") for _ in range(3)]
        assert [(a.status_code, a.json()["code"]) for a in answers] == [(429, "token_quota_exceeded")] * 3
        assert delta(before, world.figures()) == {
            "platform": {"token_quota_exceeded": 3},
            "models": {"digits": {"token_quota_exceeded": 3}},
        }
    finally:
        world.redis.delete(USAGE_PREFIX + world.tokens["one"][1])


def test_a_token_of_several_models_counts_for_the_model_its_ciphertext_names(world):
    before = world.figures()
    answer = world.query("two", "idle")
    assert (answer.status_code, answer.json()["code"]) == (503, "no_worker_up"), answer.text
    assert delta(before, world.figures()) == {"platform": {"no_worker_up": 1}, "models": {"idle": {"no_worker_up": 1}}}


def test_a_ciphertext_for_a_model_not_granted_never_moves_that_models_figures(world):
    before = world.figures()
    answer = world.query("two", "other")  # bob's model: alice's token is not assigned to it
    assert (answer.status_code, answer.json()["code"]) == (403, "token_not_for_model"), answer.text
    assert delta(before, world.figures()) == {
        "platform": {"token_not_for_model": 1},
        "accounts": {world.alice: {"token_not_for_model": 1}},
    }


def test_a_rate_refusal_counts_for_the_tenant_when_no_model_is_named(world, monkeypatch):
    frozen = float(int(time.time()) + 200_000)  # a window of its own
    monkeypatch.setattr("cipherpool.gateway.ratelimit.time.time", lambda: frozen)
    world.redis.set(f"{RATE_PREFIX}t:{world.tokens['two'][1]}:{int(frozen)}", 1000, ex=60)
    world.redis.set(f"{RATE_PREFIX}t:{world.tokens['one'][1]}:{int(frozen)}", 1000, ex=60)
    before = world.figures()
    several = world.call(world.tokens["two"][0], "GET", "/v1/client/models")
    single = world.call(world.tokens["one"][0], "GET", "/v1/client/models")
    assert several.status_code == single.status_code == 429 and several.json()["code"] == "rate_limited"
    assert delta(before, world.figures()) == {
        "platform": {"rate_limited": 2},
        "models": {"digits": {"rate_limited": 1}},  # a token of one model: that model's
        "accounts": {world.alice: {"rate_limited": 1}},  # of two, naming none: the tenant's
    }


def test_a_failed_authentication_counts_platform_wide_only(world):
    before = world.figures()
    assert world.call("cpt_" + "x" * 40, "GET", "/v1/client/models").status_code == 401
    assert world.call("wrong-metrics-token", "GET", "/metrics").status_code == 401
    assert world.client.get("/v1/stats").status_code == 401
    assert delta(before, world.figures()) == {"platform": {"invalid_token": 1, "auth_error": 1, "invalid_api_key": 1}}


def test_an_invalid_input_counts_for_the_model_and_the_providers_own_for_the_account(world):
    before = world.figures()
    answer = world.query("one", "digits", ZEROS)
    assert (answer.status_code, answer.json()["code"]) == (422, "invalid_ciphertext"), answer.text
    bad = world.call(world.a_key, "GET", "/v1/stats", params={"window_s": 10})
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_input")
    oversize = world.call(world.a_key, "POST", "/v1/models", content=b"{" * 100_000, headers={"Content-Type": "application/json"})
    assert (oversize.status_code, oversize.json()["code"]) == (413, "payload_too_large")
    assert delta(before, world.figures()) == {
        "platform": {"invalid_ciphertext": 1, "invalid_input": 1, "payload_too_large": 1},
        "models": {"digits": {"invalid_ciphertext": 1}},
        "accounts": {world.alice: {"invalid_input": 1, "payload_too_large": 1}},
    }


def test_a_nodes_refusal_relayed_with_a_result_is_not_counted_again(world):
    query_id = str(uuid.uuid4())
    world.redis.set(QUERY_OWNER_PREFIX + query_id, world.tokens["one"][1], ex=300)
    meta = {"status": "SUCCESS", "result": failed(errors.KeyMismatch("wrong key")), "task_id": query_id, "traceback": None}
    world.redis.set(RESULT_META_PREFIX + query_id, msgpack.packb(meta, use_bin_type=True), ex=300)
    before = world.figures()
    for _ in range(2):  # a client polls again
        answer = world.call(world.tokens["one"][0], "GET", f"/v1/queries/{query_id}")
        assert (answer.status_code, answer.json()["code"]) == (422, "key_mismatch")
    assert delta(before, world.figures()) == {}


# ---- where providers and operators read them ----------------------------------------------


def test_a_model_logs_at_most_one_refusals_event_a_minute_with_every_count(world):
    def logged() -> list[str]:
        answer = world.call(world.a_key, "GET", "/v1/models/noisy/events")
        assert answer.status_code == 200, answer.text
        return [e["message"] for e in answer.json() if e["kind"] == "refusals"]

    assert [world.query("spent", "noisy").status_code for _ in range(2)] == [429, 429]
    world.figures()
    [first] = logged()
    assert "refused 2 requests" in first and "2 token_quota_exceeded (quota)" in first

    assert world.query("spent", "noisy", ZEROS).status_code == 422  # within the minute: counted, not logged yet
    assert world.query("spent", "noisy").status_code == 429
    world.figures()
    assert logged() == [first]

    world.redis.delete(refusals.event_key(world.models["noisy"]))  # as the minute passing does
    world.figures()
    second = logged()[1]
    assert "refused 2 requests" in second and "1 token_quota_exceeded (quota)" in second and "1 invalid_ciphertext" in second
    world.figures()
    assert len(logged()) == 2, "nothing new: no event"


def test_a_provider_reads_its_own_models_refusals_only(world):
    from cipherpool.api.schemas import ModelStats
    from cipherpool.cli import statsview

    world.redis.hset(USAGE_PREFIX + world.tokens["one"][1], "n", QUOTA)
    try:
        assert world.query("one", "digits").status_code == 429
    finally:
        world.redis.delete(USAGE_PREFIX + world.tokens["one"][1])
    world.figures()

    answer = world.call(world.a_key, "GET", "/v1/stats", params={"model": "digits"})
    assert answer.status_code == 200, answer.text
    [digits] = [ModelStats.model_validate(m) for m in answer.json()]
    assert digits.refusals["token_quota_exceeded"] >= 1
    assert digits.refusals_all_time["token_quota_exceeded"] >= digits.refusals["token_quota_exceeded"]
    row = statsview.rows([digits])[0]
    assert row["refusals"].startswith("quota:") and set(row) == set(statsview.COLUMNS)

    theirs = world.call(world.b_key, "GET", "/v1/stats")
    assert [(m["model"], m["refusals"], m["refusals_all_time"]) for m in theirs.json()] == [("other", {}, {})]
    assert world.call(world.b_key, "GET", "/v1/stats", params={"model": "digits"}).status_code == 404


def samples(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> list[Any]:
    """The samples of ``family`` (called ``name``, if given) whose labels include ``labels``."""
    return [
        s
        for s in families[family].samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_the_operator_scrapes_refusals_by_reason_code_model_and_tenant(world):
    world.call(world.a_key, "GET", "/v1/stats", params={"window_s": 10})  # the tenant's own
    world.redis.hset(USAGE_PREFIX + world.tokens["one"][1], "n", QUOTA)
    try:
        assert world.query("one", "digits").status_code == 429
    finally:
        world.redis.delete(USAGE_PREFIX + world.tokens["one"][1])
    figures = world.figures()
    scraped = world.scrape()
    platform = {
        (s.labels["reason"], s.labels["code"]): s.value
        for s in samples(scraped, "cipherpool_refusals", "cipherpool_refusals_total")
    }
    assert platform == {(refusals.reason_of_code(c), c): n for c, n in figures["platform"].items()}
    per_model = samples(scraped, "cipherpool_model_refusals", "cipherpool_model_refusals_total")
    digits = {s.labels["code"]: s.value for s in per_model if s.labels["model"] == "digits"}
    assert digits == figures["models"]["digits"] and digits["token_quota_exceeded"] >= 1
    tenant = {(s.labels["account"], s.labels["code"]): s.value for s in per_model if s.labels["model"] == ""}
    assert tenant == {("alice", c): n for c, n in figures["accounts"][world.alice].items()}
    assert not [s for s in per_model if s.labels["account"] == "bob"], "bob's model was never refused"
    assert all(s.labels["reason"] in refusals.REASONS for s in per_model)


def test_http_requests_are_counted_by_route_template_method_and_status(world):
    assert world.query("spent", "noisy").status_code == 429
    query_id = str(uuid.uuid4())
    for _ in range(2):
        world.call(world.tokens["one"][0], "GET", f"/v1/queries/{query_id}")  # 404: not this token's
    world.call(world.tokens["one"][0], "GET", f"/v1/no-such-path/{query_id}")  # past the guard: no route has it
    world.client.get(f"/v1/no-such-path/{query_id}")  # refused by the guard first (no credential)
    world.client.get("/v1/client/models")  # refused by the guard, before routing
    scraped = world.scrape()
    counted = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in samples(scraped, "cipherpool_http_requests", "cipherpool_http_requests_total")
    }
    assert counted[("/v1/queries/{query_id}", "GET", "404")] >= 2
    assert counted[("unmatched", "GET", "404")] >= 1 and counted[("unmatched", "GET", "401")] >= 1
    assert counted[("/v1/client/models", "GET", "401")] >= 1
    assert counted[("/v1/queries", "POST", "429")] >= 1
    assert counted[("/v1/client/keys/{key_id}", "PUT", "201")] == 2
    every_label = {v for s in scraped["cipherpool_http_requests"].samples for v in s.labels.values()}
    assert not [v for v in every_label if query_id in v or "no-such-path" in v], "no raw path in a label"
    durations = samples(scraped, "cipherpool_http_request_duration_seconds", "cipherpool_http_request_duration_seconds_count")
    timed = {(s.labels["route"], s.labels["method"]): s.value for s in durations}
    assert timed[("/v1/queries", "POST")] == sum(n for (r, m, _), n in counted.items() if (r, m) == ("/v1/queries", "POST"))
    assert "status" not in durations[0].labels


# ---- the version label ------------------------------------------------------------------


def _record(redis: Any, model_id: str, plan: list[tuple[int | None, str, float]]) -> None:
    """``(version, outcome, compute seconds)`` through the nodes' own hook."""
    from cipherpool.workers.hooks import QueryEvent
    from cipherpool.workers.timings import QueryTimings

    hook = QueryTimings(lambda: redis)
    for version, outcome, compute in plan:
        query = QueryEvent("node-0@test", uuid.uuid4().hex, None, model_id=model_id, version=version)
        query.timings.update(queue_wait_s=0.01, compute_s=compute)
        if outcome == "computed":
            hook.query_computed(query)
        elif outcome == "refused":
            hook.query_refused(query, errors.KeyMismatch("wrong key"))
        else:
            hook.query_failed(query, RuntimeError("boom"))


def test_query_series_carry_the_version_and_add_up_to_the_model(world):
    _record(
        world.redis,
        world.models["other"],
        [
            (1, "computed", 0.3),
            (1, "computed", 0.7),
            (2, "computed", 3.0),
            (2, "refused", 0),
            (None, "computed", 0.02),
            (None, "failed", 0),
        ],
    )
    scraped = world.scrape()
    other = {"account": "bob", "model": "other"}
    outcomes = {
        (s.labels.get("version"), s.labels["outcome"]): s.value
        for s in samples(scraped, "cipherpool_queries", "cipherpool_queries_total", **other)
    }
    assert outcomes == {
        ("1", "computed"): 2, ("1", "refused"): 0, ("1", "failed"): 0,
        ("2", "computed"): 1, ("2", "refused"): 1, ("2", "failed"): 0,
        (None, "computed"): 1, (None, "refused"): 0, (None, "failed"): 1,
    }  # fmt: skip
    compute = samples(scraped, "cipherpool_query_compute_seconds", **other)
    counts = {s.labels.get("version"): s.value for s in compute if s.name.endswith("_count")}
    assert counts == {"1": 2, "2": 1, None: 1}
    sums = {s.labels.get("version"): s.value for s in compute if s.name.endswith("_sum")}
    assert sums["1"] == pytest.approx(1.0) and sums["2"] == pytest.approx(3.0) and sums[None] == pytest.approx(0.02)
    by_le = {(s.labels.get("version"), s.labels["le"]): s.value for s in compute if s.name.endswith("_bucket")}
    assert (by_le[("1", "0.5")], by_le[("1", "1.0")], by_le[("2", "2.5")], by_le[("2", "5.0")]) == (1, 2, 0, 1)
    total = timings.histograms(world.redis, world.models["other"])["compute"]
    assert sum(counts.values()) == total.count and sum(sums.values()) == pytest.approx(total.sum_s)
    # a model never queried: its zeros, without the label (as before versions were recorded)
    assert {s.labels.get("version", "-") for s in samples(scraped, "cipherpool_query_compute_seconds", model="idle")} == {"-"}


def test_a_node_records_the_version_a_query_ran_on(world, settings):
    from cipherpool.context import PlatformContext
    from cipherpool.fhe.evaluator import FakeEvaluator
    from cipherpool.messages import QueryRequest
    from cipherpool.store import BlobKind
    from cipherpool.workers.hooks import BindingEvent
    from cipherpool.workers.node import Binding, NodeRuntime
    from cipherpool.workers.query import Delivery, handle
    from cipherpool.workers.timings import QueryTimings

    class Store:
        def get(self, kind: BlobKind, blob_id: str) -> bytes:
            return struct.pack("<II", 0, 4) + b"\x07" * 32

    class Ctx(PlatformContext):
        def __init__(self) -> None:
            super().__init__(settings)
            self.__dict__["store"] = Store()

    model_id = uuid.uuid4().hex[:16]
    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "node-v@test",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
        hooks=[QueryTimings(lambda: world.redis)],
    )
    runtime.load_evaluator(BindingEvent("node-v@test", "w1", model_id, "m"), b"server.zip", None)
    runtime.set_binding(Binding("w1", model_id, "m", "q", evaluator, "node-v@test", version=3))
    for asked in (0, 3, 4):  # the serving version, named, and one the node does not hold (a refusal)
        body = EncryptedInput(model_id, KEY_ID, value_ciphertext()).encode()
        request = QueryRequest(token_id="t", model_id=model_id, key_id=KEY_ID, blob_id="b", input=body, version=asked)
        handle(Ctx(), runtime, request.encode(), Delivery())
    raw = world.redis.hgetall(timings.total_key(model_id))
    assert {v: (t.queries, t.refused) for v, t in timings.version_tallies(raw).items()} == {3: (2, 0), 4: (0, 1)}


# ---- the dashboard --------------------------------------------------------------------------


def _series_of(name: str, kind: str) -> set[str]:
    """The sample names of a metric family (as the exposition text names them)."""
    if kind == "counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


def _flower_names() -> set[str]:
    """The series Flower exports, read from its source: each metric its PrometheusMetrics makes."""
    spec = importlib.util.find_spec("flower.events")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    kinds = {"PrometheusCounter": "counter", "Counter": "counter", "Histogram": "histogram", "Gauge": "gauge"}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in kinds and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("flower_"):
                names |= _series_of(first.value, kinds[node.func.id])
    assert "flower_task_runtime_seconds_bucket" in names and "flower_events_total" in names, names
    return names


def _queried(text: str) -> set[str]:
    """The series a PromQL expression (or a Grafana label_values() query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # label values, regexes
    return set(re.findall(r"\b((?:cipherpool|flower)_[a-zA-Z0-9_:]+)", text))


def _expressions(node: Any) -> Iterator[str]:
    """Every panel target's ``expr`` and every query variable's query."""
    if isinstance(node, dict):
        if node.get("type") == "query" and "query" in node:
            query = node["query"]
            yield query if isinstance(query, str) else str(query.get("query", ""))
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_the_dashboard_queries_only_series_the_gateway_or_flower_exports(world):
    # traffic first, so that every family the gateway has shows a series
    world.call("cpt_" + "y" * 40, "GET", "/v1/client/models")
    world.query("two", "idle")
    _record(world.redis, world.models["digits"], [(1, "computed", 0.1)])
    world.figures()
    exported = set()
    for family in world.scrape().values():  # a family with no series yet (no shared node here) is exported too
        exported |= {s.name for s in family.samples} | _series_of(family.name, family.type)
    flower = _flower_names()

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["uid"]
    expressions = list(_expressions(dashboard))
    assert len(expressions) >= 10
    queried: set[str] = set()
    for expr in expressions:
        names = _queried(expr)
        assert names, f"no cipherpool or Flower series in {expr!r}"
        queried |= names
    unknown = sorted(queried - exported - flower)
    assert not unknown, f"the dashboard queries series nobody exports: {unknown}"
    for needed in [
        "cipherpool_refusals_total",
        "cipherpool_model_refusals_total",
        "cipherpool_http_requests_total",
        "cipherpool_http_request_duration_seconds_bucket",
        "cipherpool_query_compute_seconds_bucket",
        "cipherpool_queries_total",
        "flower_task_runtime_seconds_bucket",
        "flower_events_total",
        "cipherpool_key_cache_lookups_total",
        "cipherpool_key_load_seconds_total",
        "cipherpool_key_cache_resident_bytes",
        "cipherpool_affinity_queries_total",
        "cipherpool_affinity_routes_total",
    ]:
        assert needed in queried, f"the dashboard has no panel over {needed}"
