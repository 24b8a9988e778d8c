"""Shared nodes and query routes, fast: where a query goes (a table), the on-demand model
cache of a shared node (a fake evaluator, the real database), and the key cache's eviction
callback. The real thing runs in tests/integration/test_lifecycle.py."""

from __future__ import annotations

import pytest

from cipherpool import errors
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.fhe.keycache import KeyCache
from cipherpool.services import accounts, models, nodes
from cipherpool.services.queries import ModelGrant, Route, route
from cipherpool.statuses import ModelStatus
from cipherpool.store import BlobKind
from cipherpool.workers.shared import SharedModels
from tests.test_query_service import MemoryStore
from tests.test_services import ARTIFACT

D, S = Route.DEDICATED, Route.SHARED


@pytest.mark.parametrize(
    "dedicated, online, allows, asked, wait, expected",
    [
        (True, False, False, Route.AUTO, False, D),  # a dedicated worker is up: it takes the query
        (True, True, True, Route.AUTO, False, D),  # auto prefers it to a shared node
        (False, True, True, Route.AUTO, False, S),  # none up: a shared node of the class
        (False, True, False, Route.AUTO, False, errors.NoWorkerUp),  # a shared node, but the model does not allow it
        (False, False, True, Route.AUTO, False, errors.NoWorkerUp),
        (False, False, True, Route.AUTO, True, D),  # the caller waits in the dedicated queue
        (True, True, True, Route.SHARED, False, S),  # asked for shared
        (True, False, True, Route.SHARED, False, errors.NoWorkerUp),  # no shared node online
        (True, False, True, Route.SHARED, True, S),  # waits for a shared node
        (True, True, False, Route.SHARED, False, errors.NoWorkerUp),  # not allowed ...
        (True, True, False, Route.SHARED, True, errors.NoWorkerUp),  # ... and waiting does not change that
        (False, True, True, Route.DEDICATED, False, errors.NoWorkerUp),
        (False, True, True, Route.DEDICATED, True, D),
    ],
)
def test_where_a_query_goes(dedicated, online, allows, asked, wait, expected):
    model = ModelGrant("m" * 16, "m", ModelStatus.ACTIVE, 1, "c" * 64, "cpu", dedicated, online, allows)
    if isinstance(expected, type):
        with pytest.raises(expected):
            route(model, asked, wait)
    else:
        assert route(model, asked, wait) == expected


def test_the_key_cache_reports_what_it_drops():
    dropped = []
    cache = KeyCache(100, on_evict=lambda key, value: dropped.append((key, value)))
    for key in "abc":
        cache.get_or_load(key, lambda k=key: (k.upper(), 40))
    assert dropped == [("a", "A")] and "a" not in cache and cache.stats().charged_bytes == 80


class DbCtx(PlatformContext):
    """The real database, an in-memory store."""

    def __init__(self, settings, store):
        super().__init__(settings)
        self.__dict__["store"] = store


def test_a_shared_node_loads_models_on_demand_and_drops_the_least_recently_used(session, db_url, tmp_path):
    account, _ = accounts.create_account(session, "acme")
    store = MemoryStore()
    store.blobs[(BlobKind.SERVER_ZIP, ARTIFACT.server_blob)] = b"zip"
    for name, shared in (("a", True), ("b", True), ("c", True), ("private", False)):
        models.deploy_model(session, account, name, ARTIFACT, shared=shared)
        models.set_status(session, account, name, ModelStatus.ACTIVE)
    session.commit()
    ids = {m.name: m.id for m in models.list_models(session, account)}
    loads = []

    def factory(server_zip: bytes, workdir):
        loads.append(workdir.name.split("-")[0])
        (workdir / "circuit.so").write_bytes(b"x" * 10)
        return FakeEvaluator()

    ctx = DbCtx(Settings(data_dir=tmp_path, database_url=db_url), store)
    ticks = iter(range(1000))  # each load "adds" one byte: room for two models
    published = HashOnly()
    node = SharedModels(
        "shared1",
        "cpu",
        capacity_bytes=2,
        workdir=tmp_path,
        factory=factory,
        measure=lambda: next(ticks),
        redis=lambda: published,
    )
    _, event, version, hit = node.evaluator(ctx, ids["a"], 0)
    assert (event.model_name, event.worker_id, version, hit) == ("a", "", 1, False)
    assert node.evaluator(ctx, ids["a"], 1)[3] is True  # loaded already (version 1 is the serving one)
    node.evaluator(ctx, ids["b"], 0)
    node.evaluator(ctx, ids["a"], 0)  # a is now the most recently used
    node.evaluator(ctx, ids["c"], 0)  # evicts b, not a
    assert node.loaded() == 2 and node.evaluator(ctx, ids["a"], 0)[3] is True
    assert node.evaluator(ctx, ids["b"], 0)[3] is False
    assert loads == [ids["a"], ids["b"], ids["c"], ids["b"]]
    assert len(list(tmp_path.glob("*-v1-*"))) == 2  # an evicted model's directory went with it
    # What it holds is published for `pool nodes`, evictions included
    assert nodes.published_models(published, "shared1") == {(ids["a"], 1): 1, (ids["b"], 1): 1}
    assert [m.model for m in nodes.shared_models(session, nodes.published_models(published, "shared1"), None)] == ["a", "b"]
    bob, _ = accounts.create_account(session, "bob")
    assert nodes.shared_models(session, nodes.published_models(published, "shared1"), bob.id) == []  # not his
    node.forget_published()
    assert nodes.published_models(published, "shared1") == {}
    with pytest.raises(errors.ModelUnavailable):
        node.evaluator(ctx, ids["private"], 0)  # it does not allow shared nodes
    with pytest.raises(errors.ModelUnavailable):
        SharedModels("g", "gpu", 10, tmp_path, factory).evaluator(ctx, ids["a"], 0)  # another class


def test_a_load_that_fails_leaves_no_directory_and_publishes_nothing(session, db_url, tmp_path):
    account, _ = accounts.create_account(session, "acme")
    store = MemoryStore()
    store.blobs[(BlobKind.SERVER_ZIP, ARTIFACT.server_blob)] = b"zip"
    model = models.deploy_model(session, account, "a", ARTIFACT, shared=True)
    models.set_status(session, account, "a", ModelStatus.ACTIVE)
    session.commit()

    def refuse(server_zip: bytes, workdir):
        raise errors.BackendUnavailable("compiled for the GPU")

    published = HashOnly()
    (workdir := tmp_path / "models").mkdir()
    node = SharedModels("shared1", "cpu", 10, workdir, refuse, measure=lambda: 0, redis=lambda: published)
    with pytest.raises(errors.BackendUnavailable):
        node.evaluator(DbCtx(Settings(data_dir=tmp_path, database_url=db_url), store), model.id, 0)
    assert list(workdir.iterdir()) == [] and published.hashes == {}


class HashOnly:
    """The four hash calls a shared node publishes with (the real Redis is in test_lifecycle)."""

    def __init__(self):
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    def hset(self, key, field, value):
        self.hashes.setdefault(key, {})[field.encode()] = str(value).encode()

    def hdel(self, key, field):
        self.hashes.get(key, {}).pop(field.encode(), None)

    def delete(self, key):
        self.hashes.pop(key, None)

    def hgetall(self, key):
        return dict(self.hashes.get(key, {}))
