"""The management plane over real databases (SQLite and PostgreSQL, by the `session` fixture):
accounts, model settings and versions, rollouts, tokens, key sets, event logs; token usage
over a real Redis."""

from __future__ import annotations

import time
from datetime import UTC, timedelta

import pytest
from sqlmodel import select

from cipherpool import announce, errors
from cipherpool.clock import utcnow
from cipherpool.db.tables import (
    AccessToken,
    Account,
    EvaluationKey,
    Model,
    ModelEvent,
    ModelStatus,
    ModelVersion,
    PoolNode,
    TokenModel,
    Worker,
    WorkerStatus,
)
from cipherpool.fhe.deployment import InputSpec, Versions
from cipherpool.services import accounts, events, models, nodes, queries, rollout, tokens, usage, workers
from cipherpool.statuses import EventKind, TokenStatus
from cipherpool.store import BlobKind

V = Versions("1.9.0", "2.10.0", "3.11")
HEARTBEAT_S = 10
DAY_S = 86400


def artifact(client: str = "c", server: str = "s", shape: list[int] | None = None, dtype: str | None = None):
    """An artifact pair whose blob digests are the given characters, 64 times."""
    return models.Artifact(client * 64, server * 64, 100, 200, V, InputSpec(shape, dtype))


def deploy(session, account, name="m", art=None, **settings):
    return models.deploy_model(session, account, name, art or artifact(), **settings)


def reload(session) -> None:
    """Write what is pending and forget what the session holds: the next read comes from the database."""
    session.flush()
    session.expire_all()


def kinds(session, model) -> list[str]:
    return [e.kind for e in events.list_events(session, model)]


def startable(session, account, model_name):
    """Make the model startable (active, room under its maximum) by a direct row edit, so the
    events a test counts are its own."""
    model = models.get_model(session, account, model_name)
    model.status = ModelStatus.ACTIVE
    model.max_workers = max(model.max_workers, len(workers.serving(session, model_id=model.id)) + 1)
    session.add(model)


def running_worker(session, account, model_name, node_name, versions=None):
    """A worker UP on a fresh ONLINE node of its own."""
    startable(session, account, model_name)
    nodes.register_node(session, node_name, nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    worker = workers.start_worker(session, account, model_name, heartbeat_s=HEARTBEAT_S)
    assert worker.node_name == node_name
    workers.mark_running(session, worker.id, versions)
    workers.set_consuming(session, worker.id, True)
    assert session.get(Worker, worker.id).status == WorkerStatus.UP
    return worker


def grant_model(session, token_id, model_name):
    grant = queries.grant_for_id(session, token_id)
    return grant, next(m for m in grant.models if m.name == model_name)


@pytest.fixture
def alice(session):
    return accounts.create_account(session, "alice")


@pytest.fixture
def account(alice):
    return alice[0]


# ---- accounts ----------------------------------------------------------------------------


def test_update_account_changes_details_and_stamps_updated_at(session, account):
    assert account.updated_at is None
    before = utcnow()
    accounts.update_account(session, account, {"name": "alice-2", "organisation": "Acme", "contact_email": "ops@acme.example"})
    reload(session)
    row = accounts.find_account(session, account.id)
    assert (row.name, row.organisation, row.contact_email) == ("alice-2", "Acme", "ops@acme.example")
    assert row.updated_at is not None
    assert tokens.aware(row.updated_at) >= before - timedelta(seconds=1)
    assert accounts.describe(row).updated_at is not None
    accounts.update_account(session, row, {"organisation": None})  # clearing an optional field
    reload(session)
    assert accounts.find_account(session, account.id).organisation is None


@pytest.mark.parametrize(
    "changes", [{"api_key_hash": "x"}, {"disabled_at": None}, {"name": None}, {"name": "has space"}, {"name": ""}]
)
def test_update_account_refuses_other_fields_and_bad_names(session, account, changes):
    with pytest.raises(errors.InvalidInput):
        accounts.update_account(session, account, changes)
    reload(session)
    assert accounts.find_account(session, account.id).name == "alice"


def test_renaming_to_another_accounts_name_is_allowed_and_makes_names_ambiguous(session, account):
    bob, bob_key = accounts.create_account(session, "bob")
    accounts.update_account(session, bob, {"name": "alice"})  # no refusal: it would tell bob alice exists
    reload(session)
    assert accounts.authenticate(session, bob_key).name == "alice"
    with pytest.raises(errors.Conflict, match="2 accounts") as refused:
        accounts.find_account(session, "alice")
    assert account.id in str(refused.value) and bob.id in str(refused.value)
    assert accounts.find_account(session, bob.id).id == bob.id  # by id it is never ambiguous
    assert accounts.find_account(session, account.id).id == account.id


def test_find_account_by_id_or_name(session, account):
    accounts.create_account(session, "bob")
    reload(session)
    assert accounts.find_account(session, account.id).name == "alice"
    assert accounts.find_account(session, "alice").id == account.id
    assert accounts.find_account(session, "bob").id != account.id
    for unknown in ("carol", "0" * 16):
        with pytest.raises(errors.AccountNotFound):
            accounts.find_account(session, unknown)


def test_rotate_key_stops_the_old_key_at_once(session, alice):
    account, old = alice
    new = accounts.rotate_key(session, account)
    assert new != old and new.startswith("cpk_")
    reload(session)
    with pytest.raises(errors.InvalidApiKey):
        accounts.authenticate(session, old)
    assert accounts.authenticate(session, new).id == account.id
    row = accounts.find_account(session, account.id)
    assert new.startswith(row.api_key_prefix) and not old.startswith(row.api_key_prefix)
    assert row.updated_at is not None


def test_a_disabled_account_refuses_its_key_and_its_tokens_until_enabled(session, alice):
    account, key = alice
    deploy(session, account)
    token, value = tokens.create_token(session, account, "t", "m")
    accounts.set_disabled(session, account, True)
    reload(session)
    assert accounts.describe(accounts.find_account(session, account.id)).status.value == "disabled"
    with pytest.raises(errors.AccountDisabled):
        accounts.authenticate(session, key)
    with pytest.raises(errors.AccountDisabled):
        accounts.get_account(session, account.id)
    with pytest.raises(errors.AccountDisabled):
        tokens.resolve_token(session, value)
    with pytest.raises(errors.AccountDisabled):
        queries.grant_for_id(session, token.id)
    with pytest.raises(errors.AccountDisabled):
        queries.grant_for_value(session, value)
    first = accounts.find_account(session, account.id).disabled_at
    accounts.set_disabled(session, accounts.find_account(session, account.id), True)  # again: keeps the first time
    reload(session)
    assert accounts.find_account(session, account.id).disabled_at == first

    accounts.set_disabled(session, accounts.find_account(session, account.id), False)
    reload(session)
    assert accounts.authenticate(session, key).id == account.id
    assert accounts.get_account(session, account.id).id == account.id
    assert tokens.resolve_token(session, value).id == token.id
    assert [m.name for m in queries.grant_for_id(session, token.id).models] == ["m"]


def test_get_account_of_a_deleted_account_is_an_invalid_key(session):
    with pytest.raises(errors.InvalidApiKey):
        accounts.get_account(session, "0" * 16)


# ---- models: settings --------------------------------------------------------------------


def test_deploy_stores_settings(session, account):
    deploy(session, account, "m", description="digits classifier", hardware="gpu", min_workers=1, max_workers=3, shared=True)
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.description, model.hardware, model.min_workers, model.max_workers, model.shared) == (
        "digits classifier",
        "gpu",
        1,
        3,
        True,
    )
    assert (model.version, model.rollout_version, model.status) == (1, None, ModelStatus.DEPLOYED)
    assert kinds(session, model) == [EventKind.DEPLOYED.value]
    defaults = deploy(session, account, "plain")
    assert (defaults.hardware, defaults.min_workers, defaults.max_workers, defaults.shared) == ("cpu", 0, 1, False)


@pytest.mark.parametrize(
    "bad",
    [
        {"min_workers": 3, "max_workers": 2},
        {"max_workers": 0},
        {"min_workers": -1},
        {"hardware": "tpu"},
    ],
)
def test_deploy_refuses_invalid_settings(session, account, bad):
    with pytest.raises(errors.InvalidInput):
        deploy(session, account, "m", **bad)
    reload(session)
    assert models.list_models(session, account) == []


def test_update_settings_changes_them_and_records_which(session, account):
    deploy(session, account, "m")
    models.update_settings(session, account, "m", {"description": "new text", "max_workers": 4, "min_workers": 2, "shared": True})
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.description, model.min_workers, model.max_workers, model.shared) == ("new text", 2, 4, True)
    changed = [e for e in events.list_events(session, model) if e.kind == EventKind.SETTINGS_CHANGED.value]
    assert len(changed) == 1
    for field in ("description", "max_workers", "min_workers", "shared"):
        assert field in changed[0].message
    assert "hardware" not in changed[0].message
    models.update_settings(session, account, "m", {"max_workers": 4, "description": None})  # nothing changes
    reload(session)
    assert kinds(session, model).count(EventKind.SETTINGS_CHANGED.value) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"colour": "blue"},
        {"version": 3},
        {"min_workers": 2},  # above the current max_workers (1)
        {"max_workers": 0},
        {"hardware": "tpu"},
        {"min_workers": 5, "max_workers": 4},
    ],
)
def test_update_settings_refuses_unknown_or_invalid_settings(session, account, changes):
    deploy(session, account, "m")
    with pytest.raises(errors.InvalidInput):
        models.update_settings(session, account, "m", changes)
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.hardware, model.min_workers, model.max_workers, model.version) == ("cpu", 0, 1, 1)
    assert EventKind.SETTINGS_CHANGED.value not in kinds(session, model)


def test_hardware_cannot_change_while_a_worker_runs(session, account):
    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1")
    with pytest.raises(errors.ModelBusy):
        models.update_settings(session, account, "m", {"hardware": "gpu"})
    models.update_settings(session, account, "m", {"max_workers": 2})  # other settings may change
    reload(session)
    assert models.get_model(session, account, "m").hardware == "cpu"
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    models.update_settings(session, account, "m", {"hardware": "gpu"})
    reload(session)
    assert models.get_model(session, account, "m").hardware == "gpu"


# ---- models: versions --------------------------------------------------------------------


def test_new_versions_are_numbered_and_serve_at_once_without_workers(session, account):
    deploy(session, account, "m")
    models.add_version(session, account, "m", artifact("d"), note="retrained")
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)
    assert kinds(session, model) == [EventKind.DEPLOYED.value, EventKind.VERSION_ADDED.value, EventKind.VERSION_SERVING.value]
    added = events.list_events(session, model)[1]
    assert added.version == 2 and "retrained" in added.message
    models.add_version(session, account, "m", artifact("e"))
    reload(session)
    model = models.get_model(session, account, "m")
    assert [v.number for v in models.list_versions(session, model)] == [1, 2, 3]
    assert model.version == 3
    assert models.current_version(session, model).client_blob == "e" * 64
    assert models.get_version(session, model, 2).note == "retrained"


def test_rollback_defaults_to_the_version_before_and_checks_its_target(session, account):
    deploy(session, account, "m")
    with pytest.raises(errors.VersionNotFound):
        models.rollback(session, account, "m")  # version 1 has none before it
    models.add_version(session, account, "m", artifact("d"))
    models.add_version(session, account, "m", artifact("e"))
    models.rollback(session, account, "m")
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)
    assert kinds(session, model)[-2:] == [EventKind.ROLLED_BACK.value, EventKind.VERSION_SERVING.value]
    with pytest.raises(errors.VersionNotFound):
        models.rollback(session, account, "m", to=7)
    with pytest.raises(errors.InvalidInput, match="serves version 2"):
        models.rollback(session, account, "m", to=2)
    models.rollback(session, account, "m", to=3)  # "rollback" forwards too
    reload(session)
    assert models.get_model(session, account, "m").version == 3
    assert [e.version for e in events.list_events(session, model) if e.kind == EventKind.ROLLED_BACK.value] == [2, 3]


def test_describe_and_detail_show_versions(session, account):
    deploy(session, account, "m", art=artifact("c", "s", [1, 28, 28], "float32"), description="digits")
    models.add_version(session, account, "m", artifact("d", "t", [1, 784], "float64"), note="flat")
    reload(session)
    model = models.get_model(session, account, "m")
    out = models.describe(session, model)
    assert (out.name, out.version, out.rollout_version, out.description) == ("m", 2, None, "digits")
    detail = models.detail(session, model, running_workers=3)
    assert [(v.number, v.serving, v.rolling_out) for v in detail.versions] == [(1, False, False), (2, True, False)]
    assert detail.versions[0].input_shape == [1, 28, 28] and detail.versions[0].input_dtype == "float32"
    assert detail.versions[1].input_shape == [1, 784] and detail.versions[1].note == "flat"
    assert (detail.client_sha256, detail.server_sha256) == ("d" * 64, "t" * 64)
    assert detail.input_shape == [1, 784] and detail.running_workers == 3
    models.rollback(session, account, "m")
    reload(session)
    again = models.detail(session, models.get_model(session, account, "m"), running_workers=0)
    assert [v.serving for v in again.versions] == [True, False]
    assert again.input_shape == [1, 28, 28] and again.client_sha256 == "c" * 64
    unshaped = deploy(session, account, "plain")
    assert models.detail(session, unshaped, running_workers=0).versions[0].input_shape is None


# ---- models: deletion --------------------------------------------------------------------


def test_delete_is_refused_while_a_worker_holds_a_node(session, account):
    deploy(session, account, "m")
    nodes.register_node(session, "n1", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    startable(session, account, "m")
    worker = workers.start_worker(session, account, "m", heartbeat_s=HEARTBEAT_S)  # STARTING
    with pytest.raises(errors.ModelBusy, match=worker.id):
        models.delete_model(session, account, "m")
    workers.mark_running(session, worker.id)
    workers.set_consuming(session, worker.id, True)
    with pytest.raises(errors.ModelBusy):
        models.delete_model(session, account, "m")
    assert workers.request_stop(session, account, worker.id, heartbeat_s=HEARTBEAT_S).tell_node  # STOPPING
    with pytest.raises(errors.ModelBusy):
        models.delete_model(session, account, "m")
    reload(session)
    assert models.get_model(session, account, "m").name == "m"
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    models.delete_model(session, account, "m")
    reload(session)
    with pytest.raises(errors.ModelNotFound):
        models.get_model(session, account, "m")
    assert session.get(PoolNode, "n1").worker_id is None


def test_delete_removes_versions_assignments_keys_events_and_workers(session, account):
    model = deploy(session, account, "m")
    keep = deploy(session, account, "keep", art=artifact("k", "l"))
    models.add_version(session, account, "m", artifact("d", "t"))
    token, _ = tokens.create_token(session, account, "t", ["m", "keep"])
    grant, m = grant_model(session, token.id, "m")
    queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10)
    queries.register_key(session, grant, grant.find(keep.id), "b" * 32, "f" * 64, 10)
    worker = running_worker(session, account, "m", "n1")
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    model_id, keep_id = model.id, keep.id

    blobs = models.delete_model(session, account, "m")
    reload(session)
    assert blobs == sorted(
        {
            (BlobKind.CLIENT_ZIP, "c" * 64),
            (BlobKind.SERVER_ZIP, "s" * 64),
            (BlobKind.CLIENT_ZIP, "d" * 64),
            (BlobKind.SERVER_ZIP, "t" * 64),
            (BlobKind.EVALUATION_KEY, "e" * 64),
        }
    )
    for table in (ModelVersion, TokenModel, EvaluationKey, ModelEvent, Worker):
        assert session.exec(select(table).where(table.model_id == model_id)).all() == [], table.__name__
    assert session.get(Model, model_id) is None
    # the other model, the token and the token's other key set are untouched
    assert [m.name for m in tokens.assigned_models(session, token.id)] == ["keep"]
    assert [k.model_id for k in session.exec(select(EvaluationKey)).all()] == [keep_id]
    assert len(models.list_versions(session, models.get_model(session, account, "keep"))) == 1
    assert EventKind.DEPLOYED.value in kinds(session, models.get_model(session, account, "keep"))
    assert models.unreferenced(session, blobs) == blobs  # nothing else used them


def test_unreferenced_keeps_blobs_that_another_model_or_token_uses(session, account):
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, account, "m", art=artifact("c", "s"))
    deploy(session, bob, "other", art=artifact("c", "x"))  # the same client.zip, another account
    token, _ = tokens.create_token(session, account, "t", "m")
    other_token, _ = tokens.create_token(session, bob, "t", "other")
    grant, m = grant_model(session, token.id, "m")
    queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10)
    queries.register_key(session, grant, m, "b" * 32, "f" * 64, 10)
    other_grant, other = grant_model(session, other_token.id, "other")
    queries.register_key(session, other_grant, other, "a" * 32, "e" * 64, 10)  # the same evaluation key blob
    blobs = models.delete_model(session, account, "m")
    reload(session)
    assert (BlobKind.CLIENT_ZIP, "c" * 64) in blobs and (BlobKind.EVALUATION_KEY, "e" * 64) in blobs
    assert models.unreferenced(session, blobs) == [(BlobKind.EVALUATION_KEY, "f" * 64), (BlobKind.SERVER_ZIP, "s" * 64)]
    # a server blob shared with a client blob's digest is a different kind: not confused
    assert models.unreferenced(session, [(BlobKind.SERVER_ZIP, "c" * 64)]) == [(BlobKind.SERVER_ZIP, "c" * 64)]
    assert models.unreferenced(session, [(BlobKind.SERVER_ZIP, "x" * 64)]) == []


# ---- rollout -----------------------------------------------------------------------------


def test_a_running_worker_holds_the_serving_version_until_it_loads_the_new_one(session, account):
    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1", versions={1})
    assert session.get(Worker, worker.id).version == 1
    models.add_version(session, account, "m", artifact("d"))
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (1, 2)
    assert rollout.versions_to_hold(model) == {1, 2}
    assert kinds(session, model)[-2:] == [EventKind.VERSION_ADDED.value, EventKind.ROLLOUT_STARTED.value]
    assert [(v.number, v.serving, v.rolling_out) for v in models.detail(session, model, 1).versions] == [
        (1, True, False),
        (2, False, True),
    ]

    assert rollout.worker_loaded(session, worker.id, 2) is True
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)
    assert rollout.versions_to_hold(model) == {2}
    assert session.get(Worker, worker.id).version == 2
    assert kinds(session, model)[-2:] == [EventKind.WORKER_LOADED_VERSION.value, EventKind.VERSION_SERVING.value]
    loaded = events.list_events(session, model)[-2]
    assert (loaded.worker_id, loaded.version) == (worker.id, 2)


def test_with_two_running_workers_the_flip_waits_for_both(session, account):
    deploy(session, account, "m")
    w1 = running_worker(session, account, "m", "n1", versions={1})
    w2 = running_worker(session, account, "m", "n2", versions={1})
    models.add_version(session, account, "m", artifact("d"))
    assert rollout.worker_loaded(session, w1.id, 2) is False
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (1, 2)
    assert EventKind.VERSION_SERVING.value not in kinds(session, model)[1:]
    assert rollout.worker_loaded(session, w1.id, 2) is False  # reported twice: still waiting for w2
    assert rollout.worker_loaded(session, w2.id, 2) is True
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)
    assert kinds(session, model).count(EventKind.VERSION_SERVING.value) == 1


def test_a_rollout_completes_when_the_last_worker_without_the_new_version_stops(session, account):
    deploy(session, account, "m")
    w1 = running_worker(session, account, "m", "n1", versions={1})
    w2 = running_worker(session, account, "m", "n2", versions={1})
    models.add_version(session, account, "m", artifact("d"))
    assert rollout.worker_loaded(session, w1.id, 2) is False  # w2 has not loaded it yet
    workers.finish(session, w2.id, WorkerStatus.STOPPED)  # ... and never will
    reload(session)
    model = models.get_model(session, account, "m")
    assert workers.running_count(session, model.id) == 1 and session.get(Worker, w1.id).version == 2
    assert (model.version, model.rollout_version) == (2, None)


def test_a_report_for_another_version_does_not_flip(session, account):
    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1", versions={1})
    models.add_version(session, account, "m", artifact("d"))
    assert rollout.worker_loaded(session, worker.id, 1) is False
    assert rollout.worker_loaded(session, "0" * 16, 2) is False  # unknown worker
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (1, 2)


def test_a_worker_on_an_offline_node_does_not_hold_a_rollout(session, account):
    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1", versions={1})
    nodes.node_offline(session, worker.node_name)
    models.add_version(session, account, "m", artifact("d"))
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)


def test_a_starting_worker_holds_a_rollout_until_it_comes_up_with_the_new_version(session, account):
    """A node still loading may have read the model before the new version existed: the
    switch waits until it is up and holds the new version (it loads what it missed)."""
    deploy(session, account, "m")
    nodes.register_node(session, "n1", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    startable(session, account, "m")
    starting = workers.start_worker(session, account, "m", heartbeat_s=HEARTBEAT_S)
    models.add_version(session, account, "m", artifact("d"))
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (1, 2)
    workers.mark_running(session, starting.id, {1})  # came up with version 1 only: no switch
    workers.set_consuming(session, starting.id, True)
    reload(session)
    assert (models.get_model(session, account, "m").version, session.get(Worker, starting.id).version) == (1, 1)
    rollout.worker_loaded(session, starting.id, 2)  # its catch-up load reports
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, None)


def test_a_starting_worker_that_comes_up_holding_the_new_version_completes_the_rollout(session, account):
    deploy(session, account, "m")
    nodes.register_node(session, "n1", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    startable(session, account, "m")
    starting = workers.start_worker(session, account, "m", heartbeat_s=HEARTBEAT_S)
    models.add_version(session, account, "m", artifact("d"))
    workers.mark_running(session, starting.id, {1, 2})
    workers.set_consuming(session, starting.id, True)
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version, session.get(Worker, starting.id).version) == (2, None, 2)


def test_rolling_back_to_the_serving_version_abandons_a_rollout(session, account):
    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1", versions={1})
    models.add_version(session, account, "m", artifact("d"))
    models.rollback(session, account, "m", to=1)
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (1, None)
    assert kinds(session, model)[-2:] == [EventKind.ROLLED_BACK.value, EventKind.VERSION_SERVING.value]
    assert rollout.worker_loaded(session, worker.id, 2) is False  # a late report of the abandoned version
    reload(session)
    assert models.get_model(session, account, "m").version == 1


def test_rollback_with_a_running_worker_is_rolled_out_too(session, account):
    deploy(session, account, "m")
    models.add_version(session, account, "m", artifact("d"))  # no worker yet: serves at once
    worker = running_worker(session, account, "m", "n1", versions={2})
    models.rollback(session, account, "m")
    reload(session)
    model = models.get_model(session, account, "m")
    assert (model.version, model.rollout_version) == (2, 1)
    assert rollout.versions_to_hold(model) == {1, 2}
    assert rollout.worker_loaded(session, worker.id, 1) is True
    reload(session)
    assert models.get_model(session, account, "m").version == 1


# ---- tokens ------------------------------------------------------------------------------


def test_token_expiry_options(session, account):
    deploy(session, account)
    default, _ = tokens.create_token(session, account, "default", "m")
    short, _ = tokens.create_token(session, account, "short", "m", ttl_s=3600)
    when = (utcnow() + timedelta(days=2)).replace(microsecond=0)
    fixed, _ = tokens.create_token(session, account, "fixed", "m", expires_at=when)
    forever, _ = tokens.create_token(session, account, "forever", "m", no_expiry=True)
    reload(session)
    now = utcnow()
    default_at = tokens.aware(session.get(AccessToken, default.id).expires_at)
    assert abs(default_at - (now + timedelta(days=30))) < timedelta(minutes=1)
    assert abs(tokens.aware(session.get(AccessToken, short.id).expires_at) - (now + timedelta(hours=1))) < timedelta(minutes=1)
    assert tokens.aware(session.get(AccessToken, fixed.id).expires_at) == when
    assert session.get(AccessToken, forever.id).expires_at is None
    naive = tokens.expiry(expires_at=(now + timedelta(hours=1)).replace(tzinfo=None))  # naive: taken as UTC
    assert abs(naive - (now + timedelta(hours=1))) < timedelta(seconds=1)


@pytest.mark.parametrize(
    "options",
    [
        {"ttl_s": 60, "no_expiry": True},
        {"ttl_s": 60, "expires_at": "future"},
        {"expires_at": "future", "no_expiry": True},
        {"ttl_s": 60, "expires_at": "future", "no_expiry": True},
        {"expires_at": "past"},
        {"ttl_s": 0},
        {"ttl_s": -5},
    ],
)
def test_bad_expiry_options_are_refused(session, account, options):
    deploy(session, account)
    moments = {"future": utcnow() + timedelta(days=1), "past": utcnow() - timedelta(seconds=1)}
    options = {k: moments.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(errors.InvalidInput):
        tokens.create_token(session, account, "t", "m", **options)
    reload(session)
    assert tokens.list_tokens(session, account) == []


def test_a_token_may_be_assigned_to_several_models_of_its_account_only(session, account):
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, account, "a")
    deploy(session, account, "b")
    deploy(session, bob, "theirs")
    token, value = tokens.create_token(session, account, "t", ["b", "a", "b"])
    reload(session)
    assert [m.name for m in tokens.assigned_models(session, token.id)] == ["a", "b"]
    assert [m.name for m in queries.grant_for_value(session, value).models] == ["a", "b"]
    with pytest.raises(errors.ModelNotFound):
        tokens.create_token(session, account, "bad", ["a", "theirs"])
    reload(session)
    assert [t.name for t in tokens.list_tokens(session, account)] == ["t"]
    unassigned, _ = tokens.create_token(session, account, "none")
    assert tokens.assigned_models(session, unassigned.id) == []


def test_update_token_changes_name_expiry_quota_and_enabled(session, account):
    deploy(session, account)
    token, value = tokens.create_token(session, account, "t", "m", ttl_s=60)
    tokens.update_token(session, account, token.id, {"name": "renamed", "quota": 10})
    reload(session)
    row = tokens.get_token(session, account, token.id)
    assert (row.name, row.quota) == ("renamed", 10) and row.updated_at is not None
    assert row.expires_at is not None
    tokens.update_token(session, account, token.id, {"expires_at": None, "quota": None})
    reload(session)
    row = tokens.get_token(session, account, token.id)
    assert (row.expires_at, row.quota) == (None, None)
    assert tokens.resolve_token(session, value, now=utcnow() + timedelta(days=3650)).id == token.id  # never expires
    later = (utcnow() + timedelta(days=5)).replace(microsecond=0)
    tokens.update_token(session, account, token.id, {"expires_at": later})
    reload(session)
    assert tokens.aware(tokens.get_token(session, account, token.id).expires_at) == later
    tokens.update_token(session, account, token.id, {"enabled": False})
    reload(session)
    with pytest.raises(errors.TokenDisabled):
        tokens.resolve_token(session, value)
    tokens.update_token(session, account, token.id, {"enabled": True})
    reload(session)
    assert tokens.get_token(session, account, token.id).disabled_at is None
    assert tokens.resolve_token(session, value).id == token.id


@pytest.mark.parametrize(
    "changes", [{"name": "bad name"}, {"quota": -1}, {"quota": "ten"}, {"prefix": "cpt_x"}, {"revoked_at": None}]
)
def test_update_token_refuses_bad_changes(session, account, changes):
    deploy(session, account)
    token, _ = tokens.create_token(session, account, "t", "m", quota=3)
    with pytest.raises(errors.InvalidInput):
        tokens.update_token(session, account, token.id, changes)


def test_a_revoked_token_cannot_be_updated(session, account):
    deploy(session, account)
    token, value = tokens.create_token(session, account, "t", "m")
    tokens.revoke_token(session, account, token.id)
    for changes in ({"enabled": True}, {"name": "again"}, {"expires_at": None}):
        with pytest.raises(errors.InvalidInput, match="revoked"):
            tokens.update_token(session, account, token.id, changes)
    reload(session)
    assert tokens.get_token(session, account, token.id).name == "t"
    with pytest.raises(errors.TokenRevoked):
        tokens.resolve_token(session, value)


def test_assign_and_unassign_are_idempotent_and_recorded(session, account):
    a, b = deploy(session, account, "a"), deploy(session, account, "b")
    token, _ = tokens.create_token(session, account, "t", "a")
    tokens.assign(session, account, token.id, "b")
    tokens.assign(session, account, token.id, "b")
    reload(session)
    assert [m.name for m in tokens.assigned_models(session, token.id)] == ["a", "b"]
    assigned = [e for e in events.list_events(session, b) if e.kind == EventKind.TOKEN_ASSIGNED.value]
    assert [e.token_id for e in assigned] == [token.id]  # once, not twice
    tokens.unassign(session, account, token.id, "a")
    tokens.unassign(session, account, token.id, "a")
    reload(session)
    assert [m.name for m in tokens.assigned_models(session, token.id)] == ["b"]
    assert kinds(session, a) == [EventKind.DEPLOYED.value, EventKind.TOKEN_ASSIGNED.value, EventKind.TOKEN_UNASSIGNED.value]
    assert events.list_events(session, a)[-1].token_id == token.id
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, bob, "theirs")
    with pytest.raises(errors.ModelNotFound):
        tokens.assign(session, account, token.id, "theirs")
    with pytest.raises(errors.TokenNotFound):
        tokens.assign(session, bob, token.id, "theirs")


def test_each_refusal_of_a_token_is_its_own_error(session, account):
    deploy(session, account)
    revoked, revoked_value = tokens.create_token(session, account, "revoked", "m")
    disabled, disabled_value = tokens.create_token(session, account, "disabled", "m")
    _, expiring = tokens.create_token(session, account, "expiring", "m", ttl_s=60)
    tokens.revoke_token(session, account, revoked.id)
    tokens.update_token(session, account, disabled.id, {"enabled": False})
    reload(session)
    cases = [
        (revoked_value, None, errors.TokenRevoked),
        (disabled_value, None, errors.TokenDisabled),
        (expiring, utcnow() + timedelta(seconds=61), errors.TokenExpired),
    ]
    for value, now, expected in cases:
        with pytest.raises(expected) as refused:
            tokens.resolve_token(session, value, now=now)
        assert type(refused.value) is expected and isinstance(refused.value, errors.InvalidToken)
    assert tokens.resolve_token(session, expiring, now=utcnow() + timedelta(seconds=30)) is not None
    with pytest.raises(errors.TokenDisabled):
        queries.grant_for_id(session, disabled.id)
    with pytest.raises(errors.TokenRevoked):
        queries.grant_for_id(session, revoked.id)


def test_an_unassigned_token_may_not_query_the_model(session, account):
    model = deploy(session, account, "m")
    deploy(session, account, "other")
    models.set_status(session, account, "m", ModelStatus.ACTIVE)
    token, _ = tokens.create_token(session, account, "t", ["m", "other"])
    assert queries.check_query(queries.grant_for_id(session, token.id), model.id, wait_for_worker=True).name == "m"
    tokens.unassign(session, account, token.id, "m")
    reload(session)
    grant = queries.grant_for_id(session, token.id)
    with pytest.raises(errors.TokenNotForModel):
        queries.check_query(grant, model.id)
    with pytest.raises(errors.TokenNotForModel):
        queries.pick_model(grant, "m")


def test_pick_model(session, account):
    deploy(session, account, "a")
    deploy(session, account, "b")
    none, _ = tokens.create_token(session, account, "none")
    one, _ = tokens.create_token(session, account, "one", "a")
    two, _ = tokens.create_token(session, account, "two", ["a", "b"])
    reload(session)
    with pytest.raises(errors.TokenNotForModel, match="any model"):
        queries.pick_model(queries.grant_for_id(session, none.id), None)
    grant = queries.grant_for_id(session, one.id)
    assert queries.pick_model(grant, None).name == "a"
    assert queries.pick_model(grant, "a").name == "a"
    with pytest.raises(errors.TokenNotForModel):
        queries.pick_model(grant, "b")
    grant = queries.grant_for_id(session, two.id)
    with pytest.raises(errors.InvalidInput, match="several"):
        queries.pick_model(grant, None)
    assert queries.pick_model(grant, "b").name == "b"


def test_token_status_precedence(session, account):
    deploy(session, account)
    token, _ = tokens.create_token(session, account, "t", "m", ttl_s=60, quota=5)
    later = utcnow() + timedelta(seconds=120)

    def status(used, now=None):
        reload(session)
        return tokens.status(tokens.get_token(session, account, token.id), usage.Usage(queries=used), now=now)

    assert status(4) == TokenStatus.ACTIVE
    assert status(5) == TokenStatus.EXHAUSTED
    assert status(4, later) == TokenStatus.EXPIRED
    assert status(5, later) == TokenStatus.EXPIRED
    tokens.update_token(session, account, token.id, {"enabled": False})
    assert status(5, later) == TokenStatus.DISABLED
    tokens.revoke_token(session, account, token.id)
    assert status(5, later) == TokenStatus.REVOKED
    unlimited, _ = tokens.create_token(session, account, "u", "m", no_expiry=True)
    reload(session)
    assert (
        tokens.status(
            tokens.get_token(session, account, unlimited.id), usage.Usage(queries=10**6), now=utcnow() + timedelta(days=10**4)
        )
        == TokenStatus.ACTIVE
    )
    zero, _ = tokens.create_token(session, account, "z", "m", quota=0)
    assert tokens.status(zero, usage.Usage()) == TokenStatus.EXHAUSTED


def test_delete_token_returns_its_key_blobs_and_removes_what_it_had(session, account):
    a, b = deploy(session, account, "a"), deploy(session, account, "b")
    token, value = tokens.create_token(session, account, "t", ["a", "b"])
    keep, _ = tokens.create_token(session, account, "keep", "a")
    grant = queries.grant_for_id(session, token.id)
    queries.register_key(session, grant, grant.find(a.id), "1" * 32, "e" * 64, 10)
    queries.register_key(session, grant, grant.find(b.id), "2" * 32, "f" * 64, 10)
    keep_grant = queries.grant_for_id(session, keep.id)
    queries.register_key(session, keep_grant, keep_grant.find(a.id), "1" * 32, "e" * 64, 10)
    blobs = tokens.delete_token(session, account, token.id)
    reload(session)
    assert blobs == [(BlobKind.EVALUATION_KEY, "e" * 64), (BlobKind.EVALUATION_KEY, "f" * 64)]
    assert models.unreferenced(session, blobs) == [(BlobKind.EVALUATION_KEY, "f" * 64)]  # keep's key uses "e"
    assert session.exec(select(TokenModel).where(TokenModel.token_id == token.id)).all() == []
    assert session.exec(select(EvaluationKey).where(EvaluationKey.token_id == token.id)).all() == []
    assert session.get(AccessToken, token.id) is None
    with pytest.raises(errors.InvalidToken):
        tokens.resolve_token(session, value)
    with pytest.raises(errors.TokenNotFound):
        tokens.get_token(session, account, token.id)
    assert [t.name for t in tokens.list_tokens(session, account)] == ["keep"]
    assert kinds(session, b)[-1] == EventKind.TOKEN_UNASSIGNED.value


def test_list_tokens_filters_by_model(session, account):
    deploy(session, account, "a")
    deploy(session, account, "b")
    deploy(session, account, "c")
    tokens.create_token(session, account, "ta", "a")
    tokens.create_token(session, account, "tab", ["a", "b"])
    tokens.create_token(session, account, "none")
    reload(session)
    assert {t.name for t in tokens.list_tokens(session, account)} == {"ta", "tab", "none"}
    assert {t.name for t in tokens.list_tokens(session, account, model_name="a")} == {"ta", "tab"}
    assert [t.name for t in tokens.list_tokens(session, account, model_name="b")] == ["tab"]
    assert tokens.list_tokens(session, account, model_name="c") == []
    with pytest.raises(errors.ModelNotFound):
        tokens.list_tokens(session, account, model_name="nope")


# ---- evaluation keys -----------------------------------------------------------------------


def test_keys_from_other_client_specs_are_refused(session, account):
    deploy(session, account, "m")
    token, _ = tokens.create_token(session, account, "t", "m")
    grant, m = grant_model(session, token.id, "m")
    with pytest.raises(errors.KeysOutdated):
        queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10, client_blob="z" * 64)
    reload(session)
    assert session.exec(select(EvaluationKey)).all() == []
    row = queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10, client_blob="c" * 64)
    assert row.client_blob == "c" * 64


def test_keys_of_the_previous_version_are_outdated_once_the_new_one_serves(session, account):
    deploy(session, account, "m")
    token, _ = tokens.create_token(session, account, "t", "m")
    grant, m = grant_model(session, token.id, "m")
    queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10)
    worker = running_worker(session, account, "m", "n1", versions={1})
    models.add_version(session, account, "m", artifact("d"))
    reload(session)
    grant, m = grant_model(session, token.id, "m")
    assert queries.key_blob(session, grant, m, "a" * 32) == "e" * 64  # still serving version 1
    rollout.worker_loaded(session, worker.id, 2)
    reload(session)
    grant, m = grant_model(session, token.id, "m")
    assert (m.version, m.client_blob) == (2, "d" * 64)
    with pytest.raises(errors.KeysOutdated, match="generate keys again"):
        queries.key_blob(session, grant, m, "a" * 32)
    queries.register_key(session, grant, m, "b" * 32, "f" * 64, 10)
    assert queries.key_blob(session, grant, m, "b" * 32) == "f" * 64


def test_keys_outdated_after_an_immediate_flip(session, account):
    deploy(session, account, "m")
    token, _ = tokens.create_token(session, account, "t", "m")
    grant, m = grant_model(session, token.id, "m")
    queries.register_key(session, grant, m, "a" * 32, "e" * 64, 10)
    models.add_version(session, account, "m", artifact("d"))
    reload(session)
    grant, m = grant_model(session, token.id, "m")
    with pytest.raises(errors.KeysOutdated) as outdated:
        queries.key_blob(session, grant, m, "a" * 32)
    assert "generate keys again" in outdated.value.message and "version 2" in outdated.value.message
    models.add_version(session, account, "m", artifact("c", "t"))  # version 3: version 1's client specs again
    reload(session)
    grant, m = grant_model(session, token.id, "m")
    assert queries.key_blob(session, grant, m, "a" * 32) == "e" * 64


def test_a_key_set_belongs_to_the_model_it_was_uploaded_for(session, account):
    a, b = deploy(session, account, "a"), deploy(session, account, "b")
    token, _ = tokens.create_token(session, account, "t", ["a", "b"])
    grant = queries.grant_for_id(session, token.id)
    queries.register_key(session, grant, grant.find(a.id), "a" * 32, "e" * 64, 10)
    assert queries.key_blob(session, grant, grant.find(a.id), "a" * 32) == "e" * 64
    with pytest.raises(errors.EvaluationKeyNotFound):
        queries.key_blob(session, grant, grant.find(b.id), "a" * 32)
    with pytest.raises(errors.EvaluationKeyNotFound):
        queries.key_blob(session, grant, grant.find(a.id), "b" * 32)


# ---- events ------------------------------------------------------------------------------


def test_events_are_read_after_a_cursor_or_since_a_moment_in_order(session, account):
    model = deploy(session, account, "m")
    reload(session)
    first = events.list_events(session, model)
    assert [e.kind for e in first] == [EventKind.DEPLOYED.value]
    time.sleep(0.02)
    mid = utcnow()
    time.sleep(0.02)
    models.set_status(session, account, "m", ModelStatus.ACTIVE)
    models.set_status(session, account, "m", ModelStatus.INACTIVE)
    models.update_settings(session, account, "m", {"description": "x"})
    reload(session)
    every = events.list_events(session, model)
    assert [e.id for e in every] == sorted(e.id for e in every)  # in the platform's order
    ids = [e.public_id for e in every]  # what a provider sees, and pages by
    assert len(set(ids)) == 4 and all(i.startswith("ev_") for i in ids)
    assert [e.kind for e in every] == [
        EventKind.DEPLOYED.value,
        EventKind.ACTIVATED.value,
        EventKind.DEACTIVATED.value,
        EventKind.SETTINGS_CHANGED.value,
    ]
    assert [e.public_id for e in events.list_events(session, model, after=first[0].public_id)] == ids[1:]
    assert [e.public_id for e in events.list_events(session, model, after=ids[2])] == ids[3:]
    assert events.list_events(session, model, after=ids[-1]) == []
    assert [e.public_id for e in events.list_events(session, model, since=mid)] == ids[1:]
    assert [e.public_id for e in events.list_events(session, model, since=mid, after=ids[1])] == ids[2:]
    with pytest.raises(errors.InvalidInput):  # a cursor that is no event of this model
        events.list_events(session, model, after="ev_" + "0" * 16)
    assert events.list_events(session, model, since=utcnow() + timedelta(seconds=5)) == []
    assert [e.public_id for e in events.list_events(session, model, limit=2)] == ids[:2]
    out = events.describe(every[1], "m")
    assert (out.id, out.kind, out.model) == (ids[1], "activated", "m")


def test_events_of_one_model_never_appear_for_another(session, account):
    bob, _ = accounts.create_account(session, "bob")
    a = deploy(session, account, "a")
    b = deploy(session, account, "b")
    theirs = deploy(session, bob, "a")  # the same name, another account
    models.set_status(session, account, "a", ModelStatus.ACTIVE)
    tokens.create_token(session, account, "t", "a")
    models.add_version(session, bob, "a", artifact("d"))
    reload(session)
    for model in (a, b, theirs):
        listed = events.list_events(session, model)
        assert listed and {(e.model_id, e.account_id) for e in listed} == {(model.id, model.account_id)}
    assert kinds(session, b) == [EventKind.DEPLOYED.value]
    assert EventKind.VERSION_ADDED.value not in kinds(session, a)
    assert EventKind.ACTIVATED.value not in kinds(session, theirs)
    everything = {e.id for e in session.exec(select(ModelEvent)).all()}
    per_model = [{e.id for e in events.list_events(session, m)} for m in (a, b, theirs)]
    assert set().union(*per_model) == everything and sum(map(len, per_model)) == len(everything)


# ---- usage (a real Redis) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    import redis

    from cipherpool.stack.redis_server import find_redis_server, start_redis
    from cipherpool.stack.supervisor import Supervisor

    try:
        find_redis_server()
    except errors.ConfigurationError as exc:
        pytest.skip(f"no redis-server: {exc}")
    tmp = tmp_path_factory.mktemp("usage")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        client = redis.Redis.from_url(url)
        try:
            yield client
        finally:
            client.close()
    finally:
        supervisor.stop_all(grace_s=5)


def test_charge_counts_queries_up_to_the_quota(redis_client):
    assert [usage.charge(redis_client, "tq", 3) for _ in range(3)] == [1, 2, 3]
    for _ in range(2):
        with pytest.raises(errors.QuotaExceeded, match="quota of 3"):
            usage.charge(redis_client, "tq", 3)
    assert usage.read(redis_client, ["tq"])["tq"].queries == 3  # refusals are not counted
    assert usage.charge(redis_client, "tq", 4) == 4  # a raised quota lets it go on
    with pytest.raises(errors.QuotaExceeded):
        usage.charge(redis_client, "t0", 0)
    assert usage.read(redis_client, ["t0"])["t0"] == usage.Usage(0, None)


def test_charge_without_quota_is_unlimited(redis_client):
    counts = [usage.charge(redis_client, "tu", None) for _ in range(50)]
    assert counts == list(range(1, 51))


def test_read_returns_counts_and_last_use_and_forget_clears_them(redis_client):
    before = utcnow()
    usage.charge(redis_client, "r1", None)
    usage.charge(redis_client, "r1", None)
    usage.charge(redis_client, "r2", 10)
    found = usage.read(redis_client, ["r1", "r2", "never"])
    assert set(found) == {"r1", "r2", "never"}
    assert (found["r1"].queries, found["r2"].queries) == (2, 1)
    for token_id in ("r1", "r2"):
        last = found[token_id].last_used_at
        assert last is not None and last.tzinfo is not None
        assert before - timedelta(seconds=1) <= last <= utcnow() + timedelta(seconds=1)
    assert found["never"] == usage.Usage(0, None)
    assert usage.exhausted(found["r1"], 2) and not usage.exhausted(found["r1"], 3)
    assert not usage.exhausted(found["r1"], None)
    usage.forget(redis_client, "r1")
    after = usage.read(redis_client, ["r1", "r2"])
    assert after["r1"] == usage.Usage(0, None) and after["r2"].queries == 1
    assert usage.read(redis_client, []) == {}


# -- the reconciler (beat): workers of lost nodes ------------------------------------------


def _silence(session, node_name, seconds):
    from datetime import timedelta

    from cipherpool.clock import utcnow
    from cipherpool.db.tables import PoolNode

    node = session.get(PoolNode, node_name)
    node.last_seen = utcnow() - timedelta(seconds=seconds)
    session.add(node)
    session.flush()


def test_the_reconciler_fails_workers_of_lost_nodes_only(session, account):
    from cipherpool.db.tables import NodeStatus, PoolNode
    from cipherpool.services.reconcile import fail_lost_workers

    deploy(session, account, "m")
    models.set_status(session, account, "m", ModelStatus.ACTIVE)
    lost = running_worker(session, account, "m", "n1")
    alive = running_worker(session, account, "m", "n2")
    stopping = running_worker(session, account, "m", "n3")
    stopping_row = session.get(Worker, stopping.id)
    stopping_row.status = WorkerStatus.STOPPING
    session.add(stopping_row)
    _silence(session, "n1", 3 * HEARTBEAT_S + 1)
    _silence(session, "n2", 3 * HEARTBEAT_S - 1)  # late, but not lost
    _silence(session, "n3", 3 * HEARTBEAT_S + 1)

    found = {x.worker_id: x for x in fail_lost_workers(session, HEARTBEAT_S)}

    assert set(found) == {lost.id, stopping.id}
    assert found[lost.id].replace and not found[stopping.id].replace  # a stopping worker is not wanted
    row = session.get(Worker, lost.id)
    assert row.status == WorkerStatus.FAILED and "n1 lost" in row.error and row.stop_reason == "node lost"
    assert session.get(PoolNode, "n1").status == NodeStatus.OFFLINE and session.get(PoolNode, "n1").worker_id is None
    assert session.get(Worker, alive.id).status == WorkerStatus.UP
    assert fail_lost_workers(session, HEARTBEAT_S) == []  # once only
    assert any(
        e.kind == "worker_failed" and e.worker_id == lost.id
        for e in events.list_events(session, models.get_model(session, account, "m"))
    )


def test_the_reconciler_does_not_replace_workers_of_an_inactive_model(session, account):
    from cipherpool.services.reconcile import fail_lost_workers

    deploy(session, account, "m")
    worker = running_worker(session, account, "m", "n1")
    models.set_status(session, account, "m", ModelStatus.INACTIVE)  # deactivated while it ran
    _silence(session, "n1", 3 * HEARTBEAT_S + 1)
    [lost] = fail_lost_workers(session, HEARTBEAT_S)
    assert lost.worker_id == worker.id and not lost.replace


def test_a_refunded_query_is_not_counted(redis_client):
    token_id = "refund" + "0" * 10
    usage.forget(redis_client, token_id)
    assert usage.charge(redis_client, token_id, 1) == 1
    usage.refund(redis_client, token_id)  # it was never published: the retry must pass the quota
    assert usage.charge(redis_client, token_id, 1) == 1
    with pytest.raises(errors.QuotaExceeded):
        usage.charge(redis_client, token_id, 1)


def test_a_credential_loaded_across_an_announced_change_is_not_cached():
    """A lookup that read the database before another gateway's change was announced (the
    cache cleared meanwhile) must not be kept: the next request loads again."""
    from cipherpool.gateway.ttlcache import TtlCache

    cache: TtlCache[str] = TtlCache(5.0)
    loads = []

    def stale_load() -> str:
        loads.append("stale")
        cache.clear()  # the change is observed by another request while this one reads
        return "stale"

    assert cache.get_or_load("k", stale_load) == "stale"
    assert cache.get_or_load("k", lambda: loads.append("fresh") or "fresh") == "fresh"
    assert cache.get_or_load("k", lambda: "never") == "fresh"  # a quiet load is cached
    assert loads == ["stale", "fresh"]


def test_events_since_a_time_with_an_offset_compare_in_utc(session, account):
    from datetime import timezone

    model = deploy(session, account, "m")
    session.flush()
    paris = timezone(timedelta(hours=2))
    before = events.list_events(session, model)[0].at - timedelta(minutes=30)
    before = before if before.tzinfo else before.replace(tzinfo=UTC)
    assert events.list_events(session, model, since=before.astimezone(paris))  # 30 min before, in +02:00
    assert not events.list_events(session, model, since=(before + timedelta(hours=1)).astimezone(paris))


def test_beat_keeps_the_minimum_and_backs_off_after_a_failed_load(session, db_url, account, tmp_path):
    from types import SimpleNamespace

    from cipherpool.config.settings import Settings
    from cipherpool.context import PlatformContext
    from cipherpool.db import session_scope
    from cipherpool.scheduler import reconcile as reconciler

    deploy(session, account, "m", min_workers=2, max_workers=3)
    models.set_status(session, account, "m", ModelStatus.ACTIVE)
    deploy(session, account, "idle")  # min_workers 0: never started by beat
    models.set_status(session, account, "idle", ModelStatus.ACTIVE)
    for name in ("n1", "n2", "n3"):
        nodes.register_node(session, name, nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    session.commit()
    sent = []
    app = SimpleNamespace(send_task=lambda name, kwargs=None, queue=None, **_: sent.append((name, queue)))
    # The worker log's Redis is unreachable here: its lines are best effort, the decisions are not.
    ctx = PlatformContext(
        Settings(data_dir=tmp_path, database_url=db_url, broker_url="redis://127.0.0.1:1/0", node_heartbeat_s=HEARTBEAT_S)
    )

    started = reconciler.keep_minimum(ctx, app)
    assert len(started) == 2 and len(sent) == 2  # up to the minimum
    assert reconciler.keep_minimum(ctx, app) == []  # pending workers count: nothing more
    with session_scope(db_url) as s:
        workers.finish(s, started[0].id, WorkerStatus.FAILED, error="load failed: broken artifact")
    assert reconciler.keep_minimum(ctx, app) == []  # a failed load: beat waits MIN_RETRY_S
    with session_scope(db_url) as s:
        row = s.get(Worker, started[0].id)
        row.stopped_at = utcnow() - timedelta(seconds=reconciler.MIN_RETRY_S + 1)
        s.add(row)
    assert len(reconciler.keep_minimum(ctx, app)) == 1  # then it tries again
    with session_scope(db_url) as s:
        models.set_status(s, s.get(Account, account.id), "m", ModelStatus.INACTIVE)
        for w in workers.serving(s, account_id=account.id):
            workers.finish(s, w.id, WorkerStatus.STOPPED)
    assert reconciler.keep_minimum(ctx, app) == []  # an inactive model is not kept up


def _gateway_auth_world(session, db_url, account, redis_client, tmp_path, monkeypatch, ttl_s: float):
    """A model with a token and a worker up, a platform context for a gateway's Authenticator
    (its Redis the test's), and every credential load counted (by digest)."""
    from types import SimpleNamespace

    from cipherpool.config.settings import Settings
    from cipherpool.context import PlatformContext
    from cipherpool.gateway import auth as auth_module

    deploy(session, account, "m")
    token, value = tokens.create_token(session, account, "t", "m")
    worker = running_worker(session, account, "m", "n1")
    session.commit()
    ctx = PlatformContext(Settings(data_dir=tmp_path, database_url=db_url, auth_cache_ttl_s=ttl_s))
    ctx.__dict__["store"] = SimpleNamespace(redis=redis_client)
    loads: list[str] = []
    monkeypatch.setattr(auth_module, "grant_for_hash", lambda s, h: loads.append(h) or queries.grant_for_hash(s, h))
    return ctx, token, value, worker, loads


@pytest.mark.parametrize("limited", [False, True], ids=["no-rate-limit", "rate-limited"])
def test_a_worker_change_drops_what_gateways_cached_of_serving_but_not_the_credentials(
    session, db_url, account, redis_client, tmp_path, monkeypatch, limited
):
    """A worker's start, stop or rollout flip bumps the serving counter: the guard sees it at
    the next request and keeps its cached credentials; a credential change still drops all.
    Through the guard's own admission and a real rate limiter (both of its branches)."""
    from types import SimpleNamespace

    from cipherpool.gateway import auth as auth_module
    from cipherpool.gateway import ttlcache as ttlcache_module
    from cipherpool.gateway.guard import Guard
    from cipherpool.gateway.ratelimit import RateLimiter
    from cipherpool.gateway.throttle import AuthThrottle
    from cipherpool.names import AUTH_GENERATION_KEY

    ctx, _, value, worker, loads = _gateway_auth_world(session, db_url, account, redis_client, tmp_path, monkeypatch, 5)
    clock = [1000.0]  # the caches' clock stands still: nothing expires while the test runs
    monkeypatch.setattr(ttlcache_module.time, "monotonic", lambda: clock[0])
    rate = 1e9 if limited else 0
    gw = SimpleNamespace(
        auth=auth_module.Authenticator(ctx),
        limiter=RateLimiter(redis_client, rate, rate),
        throttle=AuthThrottle(redis_client, 0, 60),
    )
    gw.auth.sync()  # the counters as they stand (an earlier test may have moved them)

    def request():
        return Guard._admit(gw, f"Bearer {value}", "127.0.0.1").models[0]

    assert request().dedicated and len(loads) == 1
    # A stop nobody announced is not seen while the caches live
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    session.commit()
    assert request().dedicated
    announce.serving_changed(ctx)
    model = request()
    assert not model.dedicated and not model.serving  # the stop is seen at once ...
    assert len(loads) == 1  # ... and the credential was not loaded again
    # A rollout flip on a node: the new version and its client specs, at once
    worker_2 = running_worker(session, account, "m", "n1", versions={1})  # the node is free again
    models.add_version(session, account, "m", artifact(client="d"))
    assert rollout.worker_loaded(session, worker_2.id, 2)  # the flip
    session.commit()
    assert request().version == 1  # not announced yet
    announce.serving_changed(ctx)
    model = request()
    assert (model.version, model.client_blob, model.dedicated, len(loads)) == (2, "d" * 64, True, 1)
    # A credential change drops everything
    redis_client.incr(AUTH_GENERATION_KEY)
    request()
    assert len(loads) == 2
    gw.auth.close()  # its refresher thread: nothing left to run after the test


def test_a_credential_in_use_is_reloaded_in_the_background_and_a_quiet_revocation_is_met(
    session, db_url, account, redis_client, tmp_path, monkeypatch
):
    """A steady client's lookups are loaded again before they expire, off its requests' path,
    by the credential's digest; a revocation made in the database alone (unannounced) is met
    by that refresh, before the TTL is over."""

    from cipherpool.credentials import digest
    from cipherpool.gateway import auth as auth_module
    from cipherpool.gateway import ttlcache as ttlcache_module

    class Deferred:  # the Authenticator's refresher: what is scheduled runs when the test says
        def __init__(self):
            self.pending = []

        def schedule(self, _at, fn):
            self.pending.append(fn)
            return True

        def close(self):
            self.pending = []

    ctx, token, value, worker, loads = _gateway_auth_world(session, db_url, account, redis_client, tmp_path, monkeypatch, 2)
    clock = [1000.0]
    monkeypatch.setattr(ttlcache_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(auth_module, "Refresher", lambda _name: Deferred())
    auth = auth_module.Authenticator(ctx)
    refresher = auth._refresher

    def run_due() -> None:  # what is due now (a refresh schedules the next: that one waits)
        due, refresher.pending = refresher.pending, []
        for fn in due:
            fn()

    assert auth.principal(value).token_id == token.id
    assert loads == [digest(value)]  # looked up by digest: the cache keeps no clear value
    clock[0] += 1.5
    assert auth.principal(value).token_id == token.id and len(loads) == 1  # from the cache ...
    run_due()  # ... and loaded again in the background
    assert len(loads) == 2
    clock[0] += 1.0  # 2.5 s after the first load: alive through the refresh
    grant = auth.cached_principal(value)
    assert grant is not None and auth.cached_serving(grant).models[0].dedicated
    # The serving entry's own refresh reads the database (not the state the grant first read)
    workers.finish(session, worker.id, WorkerStatus.STOPPED)  # unannounced
    session.commit()
    serving = auth._serving._entries[(grant.account_id, (grant.models[0].model_id,))]
    assert not serving.load().apply(grant).models[0].dedicated
    tokens.revoke_token(session, account, token.id)  # in the database alone: nothing announced
    session.commit()
    assert auth.cached_principal(value) is not None  # within its TTL still: served, refresh waiting
    run_due()
    assert auth.cached_principal(value) is None  # the refresh met the revocation: dropped
    with pytest.raises(errors.TokenRevoked):
        auth.principal(value)
    auth.close()
