"""What a hostile tenant or end user must not get (issue 25), proved in-process: the gateway app
on a real Redis and a SQLite database, pool nodes' answers written where a node writes them.

* every FHE run a credential causes, key warm-ups included, counts against its quota and its
  rate (a token at its quota gets the query's 429), and a shared node bills a warm-up's run;
* a ciphertext that decodes but cannot be evaluated (a well-framed message of zeros) is a
  typed 422 ``invalid_ciphertext`` before anything is counted, queued or loaded, counted as the
  caller's refusal and never in the model's error rate;
* no figure, id sequence or host name of one tenant reaches another or an end user: workers'
  stats carry no node lifetime figures (the operator's endpoint has them), the key cache starts
  anew for another model, provider-visible ids are opaque, results name no node;
* failed authentications are throttled per source address (429 + Retry-After) without a
  database lookup, the source read from X-Forwarded-For only behind a trusted proxy;
* two Authorization headers are a 400 on every path; the webhook guard refuses every IPv6
  form that embeds a private, loopback or link-local IPv4 address.

What needs real nodes and a real circuit is in ``test_abuse_stack.py``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from cipherpool import errors
from cipherpool.messages import (
    BATCH_CONTENT_TYPE,
    ITEM,
    EncryptedInput,
    QueryReply,
    batch_items,
    error_frame,
    ok,
    pack_batch,
)
from cipherpool.names import (
    AUTH_FAILURE_PREFIX,
    QUERY_OWNER_PREFIX,
    RATE_PREFIX,
    RESULT_META_PREFIX,
    USAGE_PREFIX,
)
from tests.helpers import value_ciphertext, versions_json, zip_bytes

METRICS_TOKEN = "metrics-" + "m" * 24
KEY_ID = "ab" * 16
NODES = ("node-a@vm-secret-host", "node-b@vm-secret-host")
ZEROS = struct.pack("<II", 0, 4) + bytes(32)  # a well-framed Cap'n Proto message of zeros: no value in it
LIFETIME_QUERIES = 6  # the previous tenant's queries on the node, as a node would report them


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@dataclass
class World:
    client: Any
    app: Any
    redis: Any
    db: str
    a_key: str
    b_key: str
    token: str  # A's end user: quota QUOTA, assigned to A's model
    token_id: str
    model_id: str
    b_model_id: str
    workers: list[str]
    sent: list[tuple[str, str]] = field(default_factory=list)  # (node, task) the gateway sent

    def call(self, credential: str, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.request(method, path, headers={**bearer(credential), **(headers or {})}, **kwargs)

    def usage(self) -> int:
        return int(self.redis.hget(USAGE_PREFIX + self.token_id, "n") or 0)


QUOTA = 5


def _store_meta(redis: Any, task_id: str, result: object) -> None:
    """A finished task's result, as a node's Celery stores it (msgpack)."""
    meta = {"status": "SUCCESS", "result": result, "task_id": task_id, "traceback": None, "children": []}
    redis.set(RESULT_META_PREFIX + task_id, msgpack.packb(meta, use_bin_type=True), ex=300)


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

    tmp = tmp_path_factory.mktemp("abuse")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis")
        s = Settings(
            data_dir=tmp / "data",
            broker_url=url,
            token_rate_per_s=1000,
            account_rate_per_s=1000,
            management_timeout_s=2,
            key_warmup_timeout_s=2,
            metrics_token=METRICS_TOKEN,
            auth_failure_burst=0,
        )  # the throttle's tests set their own
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)
        versions = Versions.installed()

        def artifact(tag: str) -> models.Artifact:
            client = zip_bytes(
                {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json(), "tag.txt": tag}
            )
            server = zip_bytes({"versions.json": versions_json(), "tag.txt": tag})
            blobs = store.put(BlobKind.CLIENT_ZIP, client), store.put(BlobKind.SERVER_ZIP, server)
            return models.Artifact(blobs[0], blobs[1], len(client), len(server), versions)

        with session_scope(db) as session:
            bob, b_key = accounts.create_account(session, "bob")
            alice, a_key = accounts.create_account(session, "alice")
            b_model = models.deploy_model(session, bob, "bob-model", artifact("bob"))
            a_model = models.deploy_model(session, alice, "alice-model", artifact("alice"), max_workers=2)
            models.set_status(session, alice, "alice-model", ModelStatus.ACTIVE)
            models.set_status(session, bob, "bob-model", ModelStatus.ACTIVE)
            tok, token = tokens.create_token(session, alice, "alice-t", "alice-model", quota=QUOTA)
            for i, node in enumerate(NODES):
                nodes.register_node(session, node, nodes.NodeInfo(host_class="cpu", concurrency=1, threads=None, pid=100 + i))
            session.flush()
            started = []
            for _ in NODES:
                worker = workers.start_worker(session, alice, "alice-model", s.node_heartbeat_s)
                workers.mark_running(session, worker.id, {1})
                workers.set_consuming(session, worker.id, True)
                started.append(worker.id)
            a_model_id, b_model_id, token_id = a_model.id, b_model.id, tok.id
        store.redis.close()

        app = create_app(s)
        app.state.gw.refusals.flush_s = 3600  # no "refusals" event between two reads of a model's log
        with TestClient(app, raise_server_exceptions=False) as client:
            w = World(client, app, redis.Redis.from_url(url), db, a_key, b_key, token, token_id, a_model_id, b_model_id, started)
            answer = w.call(token, "PUT", f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
            assert answer.status_code == 201, answer.text
            yield w
            w.redis.close()
    finally:
        supervisor.stop_all(grace_s=5)


@pytest.fixture
def nodes_answer(world: World, monkeypatch: pytest.MonkeyPatch):
    """Nodes that answer each warm-up (``cached`` as set) and stats request as a node would."""
    answers: dict[str, object] = {"cached": False}

    def send_to_node(_app: object, node: str, task: str, expires: float | None = None, **kwargs: object):
        task_id = str(uuid.uuid4())
        world.sent.append((node, task))
        if task.endswith("node.warm"):
            _store_meta(world.redis, task_id, ok({"seconds": 0.01, "cached": answers["cached"]}))
        elif task.endswith("node.stats"):
            _store_meta(world.redis, task_id, ok(_node_report(node, str(answers.get("worker_id")), world.model_id)))
        return SimpleNamespace(id=task_id)

    import cipherpool.dispatch
    import cipherpool.gateway.platform_status
    import cipherpool.gateway.workers

    for module in (cipherpool.dispatch, cipherpool.gateway.workers, cipherpool.gateway.platform_status):
        monkeypatch.setattr(module, "send_to_node", send_to_node)
    world.sent.clear()
    return answers


def _node_report(node: str, worker_id: str, model_id: str) -> dict[str, Any]:
    """What a node that served another tenant before answers the stats task with: its binding's
    one query, and LIFETIME_QUERIES over its life."""
    from cipherpool.fhe.evaluator import FakeEvaluator
    from cipherpool.workers.hooks import QueryEvent
    from cipherpool.workers.node import Binding, NodeRuntime

    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        node,
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
    )
    binding = Binding("previous", "p" * 16, "theirs", "q", evaluator, node)
    runtime.set_binding(binding)
    for _ in range(LIFETIME_QUERIES - 1):
        runtime.stats.query_computed(QueryEvent(node=node, task_id="t", binding=binding.event))
    binding = Binding(worker_id, model_id, "alice-model", "q", evaluator, node)
    runtime.set_binding(binding)
    runtime.stats.query_computed(QueryEvent(node=node, task_id="t", binding=binding.event))
    report: dict[str, Any] = runtime.report().model_dump(mode="json")
    assert report["node_lifetime"]["queries_succeeded"] == LIFETIME_QUERIES and report["queries_succeeded"] == 1
    return report


def _query(world: World, data: bytes) -> Any:
    envelope = EncryptedInput(world.model_id, KEY_ID, data).encode()
    return world.call(world.token, "POST", "/v1/queries", content=envelope, headers={"Content-Type": "application/octet-stream"})


def _warm(world: World, data: bytes | None = None) -> Any:
    envelope = EncryptedInput(world.model_id, KEY_ID, data if data is not None else value_ciphertext()).encode()
    return world.call(world.token, "POST", f"/v1/client/keys/{KEY_ID}/warmup", content=envelope)


# ---- warm-ups are FHE runs: quota, rate, billing ----------------------------------------


def test_each_warmup_run_counts_against_the_quota_and_a_spent_quota_is_the_querys_429(world, nodes_answer, monkeypatch):
    world.redis.delete(USAGE_PREFIX + world.token_id)
    frozen = float(int(time.time()) + 100_000)  # a window of its own
    monkeypatch.setattr("cipherpool.gateway.ratelimit.time.time", lambda: frozen)
    rate_key = f"{RATE_PREFIX}t:{world.token_id}:{int(frozen)}"
    monkeypatch.setattr(world.app.state.gw.settings, "affinity_homes", 2)  # the key set's queries may go to both

    answer = _warm(world)  # two nodes serve the model: two runs
    assert answer.status_code == 200, answer.text
    assert answer.json()["nodes"] == 2 and sorted(n for n, _ in world.sent) == sorted(NODES)
    assert world.usage() == 2
    assert int(world.redis.get(rate_key)) == 2, "each node's run counts against the token's rate"

    nodes_answer["cached"] = True  # the key is warm already on both: nothing ran, nothing counted
    assert _warm(world).status_code == 200 and world.usage() == 2
    nodes_answer["cached"] = False

    world.redis.hset(USAGE_PREFIX + world.token_id, "n", QUOTA - 1)  # room for one run: one node only
    world.sent.clear()
    answer = _warm(world)
    assert answer.status_code == 200 and answer.json()["nodes"] == 1 and len(world.sent) == 1
    assert world.usage() == QUOTA

    warm, query = _warm(world), _query(world, value_ciphertext())
    assert (warm.status_code, warm.json()["code"]) == (429, "token_quota_exceeded"), warm.text
    assert (query.status_code, query.json()["code"]) == (429, "token_quota_exceeded"), query.text
    assert warm.json()["message"] == query.json()["message"]
    assert world.usage() == QUOTA and len(world.sent) == 1, "a spent quota sends nothing"


def test_a_query_goes_to_its_key_sets_node_is_held_there_until_answered_and_spills_past_the_bound(world, monkeypatch):
    """Key affinity through the real gateway and broker: the key set's preferred node's queue,
    then (that node at its bound) the next node in rank, then the model's own queue; an answer
    read gives the node its room back; /metrics counts each placement."""
    import json as _json

    from cipherpool.affinity import ranked
    from cipherpool.messages import QueryReply, ok
    from cipherpool.names import affinity_queue, model_queue

    router = world.app.state.gw.router
    monkeypatch.setattr(router, "bound", 1)
    monkeypatch.setattr(world.app.state.gw.settings, "affinity_keys_per_node", 0.5)  # one home: room for half a key set each
    broker = world.redis
    order = ranked(KEY_ID, NODES)
    queues = [affinity_queue("cpu", world.model_id, n) for n in order] + [model_queue("cpu", world.model_id)]

    def waiting() -> list[list[str]]:
        return [[_json.loads(m)["headers"]["id"] for m in broker.lrange(q, 0, -1)] for q in queues]

    def submit() -> str:
        world.redis.delete(USAGE_PREFIX + world.token_id)
        answer = _query(world, value_ciphertext())
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    for q in queues:
        broker.delete(q)
    before = (router.routed, router.fallbacks, router.to_any)
    home, spilled, anywhere = submit(), submit(), submit()
    assert waiting() == [[home], [spilled], [anywhere]]
    assert (router.outstanding(order[0]), router.outstanding(order[1])) == (1, 1)

    _store_meta(broker, home, ok(QueryReply(output=b"out", node=order[0], version=1, key_cache="hit").encode()))
    answered = world.call(world.token, "GET", f"/v1/queries/{home}")
    assert answered.status_code == 200 and answered.content == b"out"
    assert router.outstanding(order[0]) == 0  # answered: room again at home
    again = submit()
    assert waiting()[0] == [home, again] or waiting()[0] == [again, home]
    assert (router.routed - before[0], router.fallbacks - before[1], router.to_any - before[2]) == (4, 2, 1)

    metrics = world.client.get("/metrics", headers=bearer(METRICS_TOKEN)).text
    assert re.search(r'cipherpool_affinity_routes_total\{placement="any"\} [1-9]', metrics)
    assert re.search(r'cipherpool_affinity_routes_total\{placement="next"\} [1-9]', metrics)
    for q in queues:
        broker.delete(q)
    for query_id in (spilled, anywhere, again):
        world.call(world.token, "DELETE", f"/v1/queries/{query_id}")
    assert router.outstanding(order[0]) == router.outstanding(order[1]) == 0


def test_with_key_affinity_a_warmup_goes_to_the_key_sets_homes_only(world, nodes_answer, monkeypatch):
    """A key set's homes are as many of the model's nodes as their caches have room for among
    the active key sets: a lone key set on two nodes of one key each uses (and warms) both;
    with room for half a key set per node, only its preferred one."""
    from cipherpool.affinity import preferred

    world.redis.delete(USAGE_PREFIX + world.token_id)
    world.sent.clear()
    assert _warm(world).json()["nodes"] == 2 and world.usage() == 2
    monkeypatch.setattr(world.app.state.gw.settings, "affinity_keys_per_node", 0.5)
    world.redis.delete(USAGE_PREFIX + world.token_id)
    world.sent.clear()
    answer = _warm(world)
    assert answer.status_code == 200, answer.text
    assert answer.json()["nodes"] == 1 and [n for n, _ in world.sent] == preferred(KEY_ID, NODES)
    assert world.usage() == 1


def test_a_warmup_run_is_told_to_the_hooks_and_billed_where_shared_nodes_meter_execution(world):
    from cipherpool.billing.charging import bucket_of
    from cipherpool.fhe.evaluator import FakeEvaluator
    from cipherpool.messages import QueryRequest
    from cipherpool.names import SHARED_BUCKET_PREFIX
    from cipherpool.workers.hooks import Hook
    from cipherpool.workers.node import Binding, NodeRuntime
    from cipherpool.workers.query import warm
    from cipherpool.workers.shared import ExecutionMeter
    from tests.test_query_service import Ctx, MemoryStore

    heard: list[str | None] = []

    class Ear(Hook):
        def key_warmed(self, query):
            heard.append(query.account_id)

        def query_computed(self, query):  # a warm-up is no query
            raise AssertionError("a warm-up was counted as a query")

    account = "acct-" + uuid.uuid4().hex[:8]
    from cipherpool.store import BlobKind

    store = MemoryStore()
    blob_id = store.put(BlobKind.EVALUATION_KEY, struct.pack("<II", 0, 4) + b"\x07" * 32)
    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
        hooks=[Ear(), ExecutionMeter(lambda: world.redis, "default")],
    )
    runtime.set_binding(Binding("w1", world.model_id, "m", "q", evaluator, "n1"))
    from cipherpool.config.settings import Settings

    store.redis = world.redis  # type: ignore[attr-defined]  # the worker's log line
    ctx = Ctx(Settings(), store)
    request = QueryRequest(
        token_id="t",
        model_id=world.model_id,
        key_id=KEY_ID,
        blob_id=blob_id,
        account_id=account,
        input=EncryptedInput(world.model_id, KEY_ID, value_ciphertext()).encode(),
    ).encode()
    minute = bucket_of(time.time())
    assert warm(ctx, runtime, request)["cached"] is False
    assert warm(ctx, runtime, request)["cached"] is True  # the key is warm: no run, nothing heard or billed
    assert heard == [account] and evaluator.runs == 1
    bucket = world.redis.hgetall(f"{SHARED_BUCKET_PREFIX}{account}:{minute}") or world.redis.hgetall(
        f"{SHARED_BUCKET_PREFIX}{account}:{minute + 1}"
    )
    assert int(bucket[f"{world.model_id}:default:queries".encode()]) == 1, bucket


# ---- a ciphertext that decodes but cannot be evaluated ----------------------------------


def _figures(world: World) -> Any:
    from cipherpool.monitoring import timings

    return timings.read(world.redis, world.model_id, 300).window_figures()


@pytest.mark.parametrize(
    "data, what",
    [
        (ZEROS, "no payload"),
        (value_ciphertext(raw_info=False), "no raw information"),
        (value_ciphertext(type_info=False), "no type information"),
        (value_ciphertext(data=b"\x01" * 10), "payload is 10 bytes"),
        (value_ciphertext(chunks=0), "payload is empty"),
        (value_ciphertext(precision=12), "precision is 12"),
    ],
)
def test_an_unevaluable_ciphertext_is_a_422_before_anything_is_counted_or_queued(world, nodes_answer, data, what):
    world.redis.delete(USAGE_PREFIX + world.token_id)
    before = _figures(world)
    for answer in (_query(world, data), _warm(world, data)):
        assert (answer.status_code, answer.json()["code"]) == (422, "invalid_ciphertext"), answer.text
        assert what in answer.json()["message"]
    assert world.usage() == 0 and world.sent == [], "refused before the quota or any node"
    after = _figures(world)
    assert after.refused == before.refused + 2, "the provider sees the caller's refusals"
    assert after.failed == before.failed == 0 and after.error_rate in (None, 0.0)


def _far_value(double: bool, segment: int = 1) -> bytes:
    """A valid value whose payload lies in a second segment, reached by a far pointer (a
    double-far one with ``double``), as Cap'n Proto lays out a message that outgrew its first
    segment; ``segment``: where the far pointer points."""
    from cipherpool.fhe.values import _pointer

    payload = bytes(range(96))  # shape (1, 4, 3), 64-bit
    n = len(payload)
    far = 2 | (int(double) << 2) | (0 << 3) | (segment << 32)
    first = [
        _pointer(0, 0, 3 << 16),  # root: Value at 1, three pointers
        _pointer(0, 2, 1 << 16),  # payload: Payload at 4
        _pointer(0, 3, 1 | (1 << 16)),  # rawInfo at 6
        _pointer(0, 5, 1 | (1 << 16)),  # typeInfo at 9
        _pointer(1, 0, 6 | (1 << 3)),  # Payload.data: one pointer at 5
        far,  # the blob, in the other segment
        64,  # RawInfo: integerPrecision
        _pointer(0, 0, 1 << 16),  # RawInfo.shape at 8
        _pointer(1, 2, 4 | (3 << 3)),  # Shape.dimensions at 11
        0,  # TypeInfo: lweCiphertext
        _pointer(0, 2, 1),  # its struct at 13
        1 | (4 << 32),
        3,  # dimensions 1, 4, 3
        0,
    ]
    words = struct.unpack(f"<{n // 8}Q", payload)
    # The pad: the list pointer itself; or (double) a far pointer to the content, then its tag.
    tag = _pointer(1, 0, 2 | (n << 3))
    second = [2 | (2 << 3) | (1 << 32), tag, *words] if double else [tag, *words]
    head = struct.pack("<III", 1, len(first), len(second)) + bytes(4)
    return head + struct.pack(f"<{len(first)}Q", *first) + struct.pack(f"<{len(second)}Q", *second)


@pytest.mark.parametrize("double", [False, True])
def test_a_value_spread_over_segments_is_read_through_far_pointers(double):
    from cipherpool.fhe.values import check_ciphertext

    check_ciphertext(_far_value(double))
    with pytest.raises(errors.InvalidCiphertext, match="segment that is not there"):
        check_ciphertext(_far_value(double, segment=5))
    with pytest.raises(errors.MalformedCiphertext):
        check_ciphertext(_far_value(double)[:-8])


def test_a_valid_ciphertext_still_passes(world, nodes_answer):
    world.redis.delete(USAGE_PREFIX + world.token_id)
    answer = _query(world, value_ciphertext(payload=bytes(range(96))))
    assert answer.status_code == 202, answer.text
    assert world.usage() == 1


def test_the_node_refuses_it_first_thing_before_the_key_and_as_a_refusal():
    """A hand-made query that skipped the gateway: the node refuses it before fetching or
    loading the key, and its timings hook counts it as refused, not failed."""
    from cipherpool.config.settings import Settings
    from cipherpool.fhe.evaluator import FakeEvaluator
    from cipherpool.messages import QueryRequest, unwrap
    from cipherpool.monitoring.timings import Tally
    from cipherpool.workers.node import Binding, NodeRuntime
    from cipherpool.workers.query import Delivery, handle
    from cipherpool.workers.timings import QueryTimings
    from tests.test_query_service import Ctx, MemoryStore

    written: list[Any] = []

    class Recording(QueryTimings):
        def _write(self, records):
            written.extend(records)

    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
        hooks=[Recording(lambda: None)],
    )  # type: ignore[arg-type,return-value]
    model = "m" * 16
    runtime.set_binding(Binding("w1", model, "m", "q", evaluator, "n1"))
    request = QueryRequest(
        token_id="t", model_id=model, key_id=KEY_ID, blob_id="f" * 64, input=EncryptedInput(model, KEY_ID, ZEROS).encode()
    )
    with pytest.raises(errors.InvalidCiphertext):
        unwrap(handle(Ctx(Settings(), MemoryStore()), runtime, request.encode(), Delivery()))
    assert evaluator.key_loads == 0 and evaluator.runs == 0, "refused before the key (its blob is not even there)"
    assert [r.adds for r in written] == [{"refused": 1, "w:w1:refused": 1}]
    tally = Tally(queries=3, refused=10, failed=1)
    assert tally.figures().error_rate == 0.25 and tally.figures().refusal_rate == 10 / 14


def test_a_platform_failure_refused_by_type_is_counted_as_failed():
    from cipherpool.workers.hooks import QueryEvent
    from cipherpool.workers.timings import QueryTimings

    written: list[Any] = []

    class Recording(QueryTimings):
        def _write(self, records):
            written.extend(records)

    hook = Recording(lambda: None)  # type: ignore[arg-type,return-value]
    query = QueryEvent(node="n", task_id="t", binding=None, model_id="m" * 16)
    hook.query_refused(query, errors.StoreFull("full"))
    hook.query_refused(query, errors.InvalidCiphertext("zeros"))
    assert [r.adds for r in written] == [{"failed": 1, "w:shared:failed": 1}, {"refused": 1, "w:shared:refused": 1}]


@pytest.mark.parametrize(
    "message, error",
    [
        ("Tried to transform a transport value without payload.", errors.InvalidCiphertext),
        ("Tried to transform a transport value with incompatible payload size.", errors.InvalidCiphertext),
        ("Tried to transform transport value with incompatible type info.\nExpected: ...", errors.InvalidCiphertext),
        ("Tried to transform transport value with incompatible raw info.\nExpected: ...", errors.ModelMismatch),
        ("Cannot deserialize the input", errors.MalformedCiphertext),
        ("an error of concrete's own", RuntimeError),
    ],
)
def test_concretes_own_verifier_refusals_are_the_callers_errors(message, error):
    from cipherpool.fhe.evaluator import ConcreteEvaluator

    def run(*_: object) -> bytes:
        raise RuntimeError(message)

    evaluator = object.__new__(ConcreteEvaluator)
    evaluator._server = SimpleNamespace(run=run)  # type: ignore[attr-defined]
    with pytest.raises(error):
        evaluator.run(value_ciphertext(), object())


# ---- nothing of one tenant reaches another or an end user --------------------------------


def test_workers_stats_show_a_provider_only_the_bindings_figures(world, nodes_answer):
    nodes_answer["worker_id"] = world.workers[0]
    answer = world.call(world.a_key, "GET", "/v1/workers/stats")
    assert answer.status_code == 200, answer.text
    reports = answer.json()
    assert reports and all(r["node_lifetime"] is None and r.get("blob_cache") is None for r in reports), reports
    assert {r["queries_succeeded"] for r in reports} == {1}

    for credential in (world.a_key, world.token, "wrong"):
        refused = world.call(credential, "GET", f"/v1/platform/nodes/{NODES[0]}/stats")
        assert refused.status_code == 401, refused.text
    operator = world.call(METRICS_TOKEN, "GET", f"/v1/platform/nodes/{NODES[0]}/stats")
    assert operator.status_code == 200, operator.text
    assert operator.json()["node_lifetime"]["queries_succeeded"] == LIFETIME_QUERIES
    missing = world.call(METRICS_TOKEN, "GET", "/v1/platform/nodes/nobody@nowhere/stats")
    assert missing.status_code == 404, missing.text


def test_the_key_cache_starts_anew_when_the_node_binds_another_model():
    from cipherpool.fhe.evaluator import FakeEvaluator
    from cipherpool.workers.node import Binding, NodeRuntime

    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=100,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
    )
    runtime.set_binding(Binding("w1", "a" * 16, "m", "q", evaluator, "n1"))
    for i in range(5):  # the previous tenant's keys: loads and evictions
        runtime.key_cache.get_or_load(f"k{i}", lambda: (b"key", 60))
    before = runtime.report().key_cache
    assert before.evictions == 4
    runtime.set_binding(Binding("w2", "a" * 16, "m", "q", evaluator, "n1"))  # the same model: kept
    assert runtime.report().key_cache == before
    runtime.set_binding(Binding("w3", "b" * 16, "other", "q", evaluator, "n1"))
    after = runtime.report().key_cache
    assert (after.entries, after.charged_bytes, after.evictions) == (0, 0, 0)
    stats = runtime.key_cache.stats()
    assert (stats.hits, stats.misses) == (0, 0)


def test_ids_a_provider_sees_are_opaque_and_its_events_paginate_by_them(world):
    from sqlmodel import select

    from cipherpool.alerts import rules
    from cipherpool.billing import ledger
    from cipherpool.db import session_scope
    from cipherpool.db.tables import Account, Model
    from cipherpool.scheduler import alerts as evaluate
    from cipherpool.statuses import LedgerKind

    with session_scope(world.db) as session:
        for name in ("alice", "bob"):
            account = session.exec(select(Account).where(Account.name == name)).one()
            ledger.append(session, account.id, LedgerKind.GRANT, 1_000_000, f"grant:{name}:{uuid.uuid4().hex}")
        alice = session.exec(select(Account).where(Account.name == "alice")).one()
        rule = rules.set_rule(session, alice, "alice-model", "average_query_s", 1.0).rule
        evaluate.transition(
            session,
            evaluate.Seen.of(rule, session.get(Model, world.model_id)),
            2.5,
            __import__("cipherpool.clock", fromlist=["utcnow"]).utcnow(),
        )

    events = world.call(world.a_key, "GET", "/v1/models/alice-model/events").json()
    lines = world.call(world.a_key, "GET", "/v1/credits/history").json()
    fired = world.call(world.a_key, "GET", "/v1/alerts/events").json()
    assert len(events) >= 3 and lines and fired
    for ids, pattern in (
        ([e["id"] for e in events], r"ev_[0-9a-f]{16}"),
        ([x["id"] for x in lines], r"ln_[0-9a-f]{16}"),
        ([x["id"] for x in fired], r"al_[0-9a-f]{16}"),
    ):
        assert all(isinstance(i, str) and re.fullmatch(pattern, i) for i in ids), ids

    after = world.call(world.a_key, "GET", "/v1/models/alice-model/events", params={"after": events[0]["id"]})
    assert after.status_code == 200 and after.json() == events[1:], after.text
    assert world.call(world.a_key, "GET", "/v1/models/alice-model/events", params={"after": events[-1]["id"]}).json() == []
    b_event = world.call(world.b_key, "GET", "/v1/models/bob-model/events").json()[0]["id"]
    foreign = world.call(world.a_key, "GET", "/v1/models/alice-model/events", params={"after": b_event})
    ghost = world.call(world.a_key, "GET", "/v1/models/alice-model/events", params={"after": "ev_" + "0" * 16})
    assert foreign.status_code == ghost.status_code == 422
    assert foreign.json()["code"] == ghost.json()["code"] == "invalid_input"
    assert foreign.json()["message"].replace(b_event, "ID") == ghost.json()["message"].replace("ev_" + "0" * 16, "ID")
    legacy = world.call(world.a_key, "GET", "/v1/models/alice-model/events", params={"after": "3"})
    assert legacy.status_code == 422, "an integer cursor would be a position in every account's sequence"


def test_an_end_user_is_told_no_node_name(world):
    query_id = str(uuid.uuid4())
    reply = QueryReply(output=b"out", node=NODES[0], version=1, key_cache="hit", timings={"compute_s": 0.1})
    world.redis.set(QUERY_OWNER_PREFIX + query_id, world.token_id, ex=300)
    _store_meta(world.redis, query_id, ok(reply.encode()))
    answer = world.call(world.token, "GET", f"/v1/queries/{query_id}")
    assert answer.status_code == 200, answer.text
    assert answer.content == b"out" and answer.headers["x-cipherpool-query"] == query_id
    assert "x-cipherpool-node" not in answer.headers
    shown = " ".join(f"{k}: {v}" for k, v in answer.headers.items())
    assert "node-a" not in shown and "secret-host" not in shown, shown


# ---- batches (issue 27): the same door as a query, counted per item ------------------------

BATCH_HEADERS = {"Content-Type": BATCH_CONTENT_TYPE}


def _batch(world: World, items: list[bytes], credential: str | None = None) -> Any:
    body = pack_batch([(ITEM, EncryptedInput(world.model_id, KEY_ID, d).encode()) for d in items])
    return world.call(credential or world.token, "POST", "/v1/queries/batch", content=body, headers=BATCH_HEADERS)


def test_a_batch_needs_the_end_users_token_and_its_cap_is_checked_first(world, monkeypatch):
    body = pack_batch([(ITEM, EncryptedInput(world.model_id, KEY_ID, value_ciphertext()).encode())])
    assert world.client.post("/v1/queries/batch", content=body, headers=BATCH_HEADERS).status_code == 401
    answer = _batch(world, [value_ciphertext()], credential=world.a_key)
    assert (answer.status_code, answer.json()["code"]) == (403, "wrong_credential")
    monkeypatch.setattr(world.app.state.gw.settings, "max_batch_bytes", 100)
    answer = _batch(world, [value_ciphertext()] * 3)
    assert (answer.status_code, answer.json()["code"]) == (413, "payload_too_large")


def test_a_batch_counts_each_evaluable_item_against_the_quota_all_or_none(world):
    from cipherpool import inflight
    from cipherpool.names import QUERY_BATCH_TASK

    world.redis.delete(USAGE_PREFIX + world.token_id)
    try:
        answer = _batch(world, [value_ciphertext(), ZEROS, value_ciphertext(), value_ciphertext()])
        assert answer.status_code == 202, answer.text
        assert world.usage() == 3, "the message of zeros travels, refused on the node, but is not counted"
        record = inflight.load(world.redis, [answer.json()["id"]])[answer.json()["id"]]
        assert record is not None and record.message.task == QUERY_BATCH_TASK, "one task, kept in flight as a batch"
        answer = _batch(world, [value_ciphertext()] * 3)  # the quota (5) has room for 2
        assert (answer.status_code, answer.json()["code"]) == (429, "token_quota_exceeded") and world.usage() == 3
        answer = _batch(world, [ZEROS, ZEROS])
        assert (answer.status_code, answer.json()["code"]) == (422, "invalid_ciphertext") and world.usage() == 3
        answer = world.call(world.token, "POST", "/v1/queries/batch", content=b"nonsense", headers=BATCH_HEADERS)
        assert (answer.status_code, answer.json()["code"]) == (422, "malformed_ciphertext")
        answer = _batch(world, [value_ciphertext()] * (world.app.state.gw.settings.batch_max_items + 1))
        assert (answer.status_code, answer.json()["code"]) == (422, "malformed_ciphertext") and world.usage() == 3
    finally:
        world.redis.delete(USAGE_PREFIX + world.token_id)


def test_a_batchs_result_is_framed_item_by_item_for_its_owner_only(world):
    query_id = str(uuid.uuid4())
    output = pack_batch([(ITEM, b"first"), error_frame(errors.MalformedCiphertext("bad item"))])
    reply = QueryReply(output=output, node=NODES[0], version=1, key_cache="hit", timings={"compute_s": 0.1}, batch=2)
    world.redis.set(QUERY_OWNER_PREFIX + query_id, world.token_id, ex=300)
    _store_meta(world.redis, query_id, ok(reply.encode()))
    answer = world.call(world.token, "GET", f"/v1/queries/{query_id}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == BATCH_CONTENT_TYPE and answer.headers["x-cipherpool-batch"] == "2"
    first, second = batch_items(answer.content, 2)
    assert first == b"first" and isinstance(second, errors.MalformedCiphertext) and second.message == "bad item"
    assert world.call(world.b_key, "GET", f"/v1/queries/{query_id}").status_code == 403


# ---- failed authentications, throttled per source ----------------------------------------


def _lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every credential the gateway looks up in the database (by its digest)."""
    import cipherpool.gateway.auth as auth

    seen: list[str] = []
    real_key, real_grant = auth.authenticate_hash, auth.grant_for_hash

    def key(session: object, value: str) -> object:
        seen.append(value)
        return real_key(session, value)  # type: ignore[arg-type]

    def grant(session: object, value: str) -> object:
        seen.append(value)
        return real_grant(session, value)  # type: ignore[arg-type]

    monkeypatch.setattr(auth, "authenticate_hash", key)
    monkeypatch.setattr(auth, "grant_for_hash", grant)
    return seen


@pytest.fixture
def throttled(world: World, monkeypatch: pytest.MonkeyPatch):
    """The gateway with a throttle of 3 failures per window, trusting proxies in 10.0.0.0/8."""
    from cipherpool.gateway.throttle import AuthThrottle

    for key in world.redis.scan_iter(match=AUTH_FAILURE_PREFIX + "*"):
        world.redis.delete(key)
    gw = world.app.state.gw
    monkeypatch.setattr(gw, "throttle", AuthThrottle(world.redis, 3, 60, ["10.0.0.0/8", "fd00::/8"]))
    monkeypatch.setattr(gw.auth._principals, "ttl_s", 600.0)  # what a test caches stays cached
    gw.auth.forget()

    def client(peer: str):
        from fastapi.testclient import TestClient

        return TestClient(world.app, raise_server_exceptions=False, client=(peer, 4242))

    return client


def test_failed_authentications_are_throttled_per_source_without_a_lookup(world, throttled, monkeypatch):
    lookups = _lookups(monkeypatch)
    attacker, bystander = throttled("198.51.100.7"), throttled("198.51.100.8")
    for i in range(3):
        answer = attacker.get("/v1/models", headers=bearer(f"cpk_guess{i}"))
        assert (answer.status_code, answer.json()["code"]) == (401, "invalid_api_key"), answer.text
    assert len(lookups) == 3
    for guess in ("cpk_guess3", "cpt_guess4", "cpk_" + "x" * 40, world.b_key):  # B's key: not cached here
        answer = attacker.get("/v1/models", headers=bearer(guess))
        assert (answer.status_code, answer.json()["code"]) == (429, "rate_limited"), answer.text
        assert 1 <= int(answer.headers["retry-after"]) <= 60
    assert len(lookups) == 3, "a throttled source costs no database lookup"
    assert attacker.get("/v1/models").status_code == 429  # no credential at all: the same
    assert bystander.get("/v1/models", headers=bearer(world.a_key)).status_code == 200, "other sources are served"
    assert attacker.get("/v1/models", headers=bearer(world.a_key)).status_code == 200, "a cached credential costs no lookup"
    assert len(lookups) == 4
    for path in ("/metrics", "/v1/platform/status"):  # the metrics token's paths: the same throttle
        assert attacker.get(path, headers=bearer("wrong")).status_code == 429
    assert attacker.get("/v1/health").status_code == 200


def test_the_metrics_tokens_paths_count_failures_too(world, throttled):
    scraper = throttled("203.0.113.50")
    for _ in range(3):
        assert scraper.get("/metrics", headers=bearer("wrong-metrics-token")).status_code == 401
    answer = scraper.get("/v1/platform/status", headers=bearer(METRICS_TOKEN))
    assert (answer.status_code, answer.json()["code"]) == (429, "rate_limited")
    assert throttled("203.0.113.51").get("/v1/platform/status", headers=bearer(METRICS_TOKEN)).status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_address_counts(world, throttled):
    proxy, stranger = throttled("10.1.2.3"), throttled("192.0.2.99")
    for _ in range(3):
        assert proxy.get("/v1/models", headers={**bearer("cpk_guess"), "X-Forwarded-For": "203.0.113.9"}).status_code == 401
    assert proxy.get("/v1/models", headers={**bearer("cpk_guess"), "X-Forwarded-For": "203.0.113.9"}).status_code == 429
    # Another client behind the same proxy is someone else; a forged header from a client of
    # the proxy stands left of what the proxy appended and is not believed.
    assert proxy.get("/v1/models", headers={**bearer(world.a_key), "X-Forwarded-For": "203.0.113.10"}).status_code == 200
    forged = {**bearer("cpk_guess"), "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    assert proxy.get("/v1/models", headers=forged).status_code == 429
    # An untrusted peer's header is ignored: its own address counts.
    for _ in range(3):
        assert stranger.get("/v1/models", headers={**bearer("cpk_guess"), "X-Forwarded-For": f"203.0.113.{_}"}).status_code == 401
    assert stranger.get("/v1/models", headers={**bearer("cpk_x"), "X-Forwarded-For": "203.0.113.77"}).status_code == 429
    assert world.redis.exists(f"{AUTH_FAILURE_PREFIX}192.0.2.99:{int(time.time() // 60)}")
    assert not list(world.redis.scan_iter(match=AUTH_FAILURE_PREFIX + "203.0.113.7*"))


@pytest.mark.parametrize(
    "peer, forwarded, source",
    [
        ("198.51.100.7", None, "198.51.100.7"),
        ("198.51.100.7", "203.0.113.9", "198.51.100.7"),  # not a trusted proxy: its header is ignored
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("10.0.0.1", "198.51.100.1, 203.0.113.9", "203.0.113.9"),  # what the client wrote itself is left of it
        ("10.0.0.1", "203.0.113.9, 10.0.0.2", "203.0.113.9"),  # a chain of trusted proxies is skipped
        ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),  # all trusted: the farthest
        ("10.0.0.1", "not-an-address, 10.0.0.2", "10.0.0.2"),  # garbage stops the walk
        ("10.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
        ("10.0.0.1", "203.0.113.9:5555", "203.0.113.9"),
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
        ("::ffff:10.0.0.1", "203.0.113.9", "203.0.113.9"),  # a mapped peer is its IPv4
        ("testclient", "203.0.113.9", "testclient"),
        (None, None, "unknown"),
    ],
)
def test_the_source_address_of_a_request(peer, forwarded, source):
    from cipherpool.gateway.throttle import AuthThrottle

    throttle = AuthThrottle(None, 3, 60, ["10.0.0.0/8", "fd00::/8"])  # type: ignore[arg-type]
    assert throttle.source(peer, {"x-forwarded-for": forwarded} if forwarded else {}) == source


def test_trusted_proxies_must_be_networks(monkeypatch):
    from pydantic import ValidationError

    from cipherpool.config.settings import Settings

    monkeypatch.setenv("CIPHERPOOL_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7 ,fd00::/8")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]
    monkeypatch.setenv("CIPHERPOOL_TRUSTED_PROXIES", "10.0.0.0/8,proxy.example.com")
    with pytest.raises(ValidationError):
        Settings()


# ---- two Authorization headers; webhooks to IPv6 forms of private addresses --------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/queries"),
        ("GET", "/v1/client/model"),
        ("GET", "/metrics"),
        ("GET", "/v1/platform/status"),
        ("GET", f"/v1/platform/nodes/{NODES[0]}/stats"),
        ("GET", "/v1/health"),
        ("GET", "/v1/nowhere"),
    ],
)
@pytest.mark.parametrize("order", ["token first", "key first"])
def test_two_authorization_headers_are_refused_on_every_path(world, method, path, order):
    pair = [("Authorization", f"Bearer {world.token}"), ("Authorization", f"Bearer {METRICS_TOKEN}")]
    headers = pair if order == "token first" else pair[::-1]
    answer = world.client.request(method, path, headers=headers)
    assert (answer.status_code, answer.json()["code"]) == (400, "bad_request"), answer.text


PRIVATE_V4 = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"]
PUBLIC_V4 = ["8.8.8.8", "93.184.216.34"]


def _forms(v4: str) -> dict[str, str]:
    """Every IPv6 form that embeds the IPv4 address ``v4``."""
    n = int(ipaddress.IPv4Address(v4))
    hi, lo = n >> 16, n & 0xFFFF
    inverted = n ^ 0xFFFFFFFF
    return {
        "IPv4-mapped": f"::ffff:{v4}",
        "IPv4-mapped, hex": f"::ffff:{hi:x}:{lo:x}",
        "IPv4-mapped, long": f"0:0:0:0:0:ffff:{hi:x}:{lo:x}",
        "IPv4-translated": f"::ffff:0:{v4}",
        "IPv4-compatible": f"::{v4}",
        "IPv4-compatible, hex": f"::{hi:x}:{lo:x}",
        "NAT64": f"64:ff9b::{v4}",
        "NAT64 local-use": f"64:ff9b:1::{hi:x}:{lo:x}",
        "6to4": f"2002:{hi:x}:{lo:x}::1",
        "Teredo server": f"2001:0:{hi:x}:{lo:x}::1",
        "Teredo client": f"2001:0:4136:e378:8000:63bf:{inverted >> 16:x}:{inverted & 0xFFFF:x}",
        "ISATAP": f"2a00:1450::5efe:{v4}",
    }


@pytest.mark.parametrize("v4", PRIVATE_V4)
@pytest.mark.parametrize("form", list(_forms("127.0.0.1")))
def test_the_webhook_guard_refuses_every_ipv6_form_of_a_private_ipv4(v4, form):
    from cipherpool.alerts.destination import check_url, public

    address = _forms(v4)[form]
    assert not public(ipaddress.ip_address(address)), f"{form} {address} ({v4}) passed as public"
    with pytest.raises(errors.RefusedDestination):
        check_url(f"https://[{address}]:8443/hook")


@pytest.mark.parametrize(
    "address, public_",
    [
        ("::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("2002:c0a8:101::1", False),
        ("::ffff:0:7f00:1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        *[(_forms(v4)[form], True) for v4 in PUBLIC_V4 for form in ("IPv4-mapped", "NAT64", "6to4")],
        ("2606:4700:4700::1111", True),
        ("2a00:1450:4001:81c::200e", True),
        ("8.8.8.8", True),
        ("64:ff9b:1::808:808", False),  # local-use NAT64: where the IPv4 sits is the network's choice
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo: never a webhook's destination
    ],
)
def test_the_webhook_guard_table(address, public_):
    from cipherpool.alerts.destination import public

    assert public(ipaddress.ip_address(address)) is public_


def test_a_name_resolving_to_an_embedded_private_address_is_refused(monkeypatch):
    import socket

    from cipherpool.alerts.destination import check_resolved

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET6, 1, 6, "", ("64:ff9b::7f00:1", 443, 0, 0))])
    with pytest.raises(errors.RefusedDestination):
        check_resolved("https://hooks.example.com/x")
