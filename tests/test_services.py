"""Services over a real SQLite database: auth, tenancy, tokens, node claims."""

import hashlib
from datetime import timedelta

import pytest
from sqlmodel import select

from cipherpool import errors
from cipherpool.clock import utcnow
from cipherpool.db.tables import AccessToken, Account, ModelStatus, PoolNode, Worker, WorkerStatus
from cipherpool.fhe.deployment import Versions
from cipherpool.services import accounts, models, nodes, queries, tokens, workers
from cipherpool.statuses import StopReason

V = Versions("1.9.0", "2.10.0", "3.11")


ARTIFACT = models.Artifact("c" * 64, "s" * 64, 100, 200, V)


def deploy(session, account, name="m", hardware="cpu", active=True, **settings):
    """A model that may have a few workers, active unless told (a start needs both)."""
    model = models.deploy_model(session, account, name, ARTIFACT, hardware=hardware, **{"max_workers": 4, **settings})
    return models.set_status(session, account, name, ModelStatus.ACTIVE) if active else model


@pytest.fixture
def alice(session):
    return accounts.create_account(session, "alice")


def test_api_keys_are_stored_only_as_hashes(session, alice):
    account, key = alice
    row = session.exec(select(Account)).one()
    assert key.startswith("cpk_") and len(key) > len(row.api_key_prefix) and key.startswith(row.api_key_prefix)
    assert row.api_key_hash == hashlib.sha256(key.encode()).hexdigest()  # the hash, not the key
    assert key not in {str(value) for value in row.model_dump().values()}  # in no column at all
    assert accounts.authenticate(session, key).id == account.id


@pytest.mark.parametrize("key", [None, "", "cpt_wrongkind", "cpk_unknown"])
def test_bad_api_keys_are_refused(session, alice, key):
    with pytest.raises(errors.InvalidApiKey):
        accounts.authenticate(session, key)


def test_tenants_do_not_see_each_other(session, alice):
    account, _ = alice
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, account, "digits")
    assert models.list_models(session, bob) == []
    with pytest.raises(errors.ModelNotFound):
        models.get_model(session, bob, "digits")
    with pytest.raises(errors.ModelNotFound):
        tokens.create_token(session, bob, "t", "digits")
    token, _ = tokens.create_token(session, account, "t", "digits")
    with pytest.raises(errors.TokenNotFound):
        tokens.revoke_token(session, bob, token.id)
    assert tokens.list_tokens(session, bob) == []
    deploy(session, bob, "digits")  # the same name in another account is fine


@pytest.mark.parametrize("name", ["", "-leading", "has space", "x" * 65, "semi;colon", "ünïcode"])
def test_names_are_checked(session, alice, name):
    with pytest.raises(errors.InvalidInput, match="Invalid"):
        deploy(session, alice[0], name)
    with pytest.raises(errors.InvalidInput):
        accounts.create_account(session, name)


def test_bad_hardware_and_ttl_are_typed_errors(session, alice):
    with pytest.raises(errors.InvalidInput, match="hardware"):
        deploy(session, alice[0], "m", hardware="tpu")
    deploy(session, alice[0], "m")
    with pytest.raises(errors.InvalidInput, match="positive"):
        tokens.create_token(session, alice[0], "t", "m", ttl_s=-1)


def test_duplicate_model_names_conflict(session, alice):
    deploy(session, alice[0], "m")
    with pytest.raises(errors.ModelExists):
        deploy(session, alice[0], "m")


def test_tokens_are_hashed_revocable_and_expire(session, alice):
    account, _ = alice
    model = deploy(session, account)
    token, value = tokens.create_token(session, account, "web", "m")
    assert value not in {r.token_hash for r in session.exec(select(AccessToken))}
    assert [m.id for m in tokens.assigned_models(session, tokens.resolve_token(session, value).id)] == [model.id]
    assert tokens.resolve_token(session, value, now=utcnow()).id == token.id
    tokens.revoke_token(session, account, token.id)
    with pytest.raises(errors.InvalidToken, match="revoked"):
        tokens.resolve_token(session, value)
    _, short = tokens.create_token(session, account, "short", "m", ttl_s=60)
    with pytest.raises(errors.InvalidToken, match="expired"):
        tokens.resolve_token(session, short, now=utcnow() + timedelta(seconds=61))


def test_query_authorisation(session, alice):
    account, _ = alice
    m1, m2 = deploy(session, account, "m1", active=False), deploy(session, account, "m2", active=False)
    token, value = tokens.create_token(session, account, "t", "m1")
    with pytest.raises(errors.ModelInactive):
        queries.check_query(queries.grant_for_value(session, value), m1.id)
    models.set_status(session, account, "m1", ModelStatus.ACTIVE)
    grant = queries.grant_for_value(session, value)
    queries.check_query(grant, m1.id, wait_for_worker=True)  # no worker up: only if the caller waits
    assert grant == queries.grant_for_id(session, token.id)  # the gateway's and the in-cluster path agree
    assert ([m.model_id for m in grant.models], grant.account_id) == ([m1.id], account.id)
    with pytest.raises(errors.TokenNotForModel):
        queries.check_query(grant, m2.id)
    for bad in ("cpt_nope", "cpk_an-api-key", "", None, 42):
        with pytest.raises(errors.InvalidToken):
            queries.grant_for_value(session, bad)
    with pytest.raises(errors.InvalidToken):
        queries.grant_for_id(session, "0" * 16)
    tokens.revoke_token(session, account, token.id)
    for lookup in (lambda: queries.grant_for_value(session, value), lambda: queries.grant_for_id(session, token.id)):
        with pytest.raises(errors.InvalidToken, match="revoked"):
            lookup()


def test_keys_belong_to_the_token_that_uploaded_them(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    t1, _ = tokens.create_token(session, account, "t1", "m")
    t2, _ = tokens.create_token(session, account, "t2", "m")
    g1, g2 = queries.grant_for_id(session, t1.id), queries.grant_for_id(session, t2.id)
    m = g1.models[0]
    queries.register_key(session, g1, m, "a" * 32, "b" * 64, 10)
    queries.register_key(session, g1, m, "a" * 32, "c" * 64, 12)  # same key set re-uploaded
    assert queries.key_blob(session, g1, m, "a" * 32) == "c" * 64
    with pytest.raises(errors.EvaluationKeyNotFound):
        queries.key_blob(session, g2, m, "a" * 32)
    with pytest.raises(errors.InvalidEvaluationKey):
        queries.register_key(session, g1, m, "not-hex", "b" * 64, 10)


def test_key_sets_per_token_are_capped(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    token, _ = tokens.create_token(session, account, "t", "m")
    grant = queries.grant_for_id(session, token.id)
    m = grant.models[0]
    for i in range(2):
        queries.register_key(session, grant, m, f"{i:032x}", "b" * 64, 10, max_keys=2)
    queries.register_key(session, grant, m, f"{1:032x}", "c" * 64, 10, max_keys=2)  # a re-upload is not a new set
    with pytest.raises(errors.TooManyKeys):
        queries.register_key(session, grant, m, f"{2:032x}", "b" * 64, 10, max_keys=2)


def register(session, name, host_class="cpu"):
    return nodes.register_node(session, name, nodes.NodeInfo(host_class=host_class, concurrency=1, threads=1, pid=1))


def test_each_node_is_claimed_once_and_freed_when_the_worker_ends(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    register(session, "n1")
    register(session, "n2")
    register(session, "g1", host_class="gpu")
    w1 = workers.start_worker(session, account, "m", heartbeat_s=10)
    w2 = workers.start_worker(session, account, "m", heartbeat_s=10)
    assert {w1.node_name, w2.node_name} == {"n1", "n2"}  # never the gpu node for a cpu model
    with pytest.raises(errors.NoFreeNode):
        workers.start_worker(session, account, "m", heartbeat_s=10)
    workers.mark_running(session, w1.id)
    workers.set_consuming(session, w1.id, True)
    assert nodes.binding_of_node(session, w1.node_name)[0].status == WorkerStatus.UP
    workers.finish(session, w1.id, WorkerStatus.STOPPED)
    assert session.get(PoolNode, w1.node_name).worker_id is None
    assert nodes.binding_of_node(session, w1.node_name) is None
    assert workers.start_worker(session, account, "m", heartbeat_s=10).node_name == w1.node_name


def test_offline_and_stale_nodes_are_not_offered(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    register(session, "n1")
    nodes.node_offline(session, "n1")
    with pytest.raises(errors.NoFreeNode):
        workers.start_worker(session, account, "m", heartbeat_s=10)
    assert not nodes.node_is_live(session, "n1", heartbeat_s=10)
    nodes.heartbeat(session, "n1")
    assert nodes.node_is_live(session, "n1", heartbeat_s=10)
    node = session.get(PoolNode, "n1")
    node.last_seen = utcnow() - timedelta(seconds=31)
    session.add(node)
    with pytest.raises(errors.NoFreeNode):
        workers.start_worker(session, account, "m", heartbeat_s=10)
    assert not nodes.node_is_live(session, "n1", heartbeat_s=10)


def test_workers_of_other_accounts_are_invisible(session, alice):
    account, _ = alice
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, account, "m")
    register(session, "n1")
    w = workers.start_worker(session, account, "m", heartbeat_s=10)
    with pytest.raises(errors.WorkerNotFound):
        workers.request_stop(session, bob, w.id, heartbeat_s=10)
    assert workers.list_workers(session, bob) == []


def test_stopping_tells_a_live_node_and_releases_a_dead_one_at_once(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    register(session, "n1")
    register(session, "n2")
    live, dead = (workers.start_worker(session, account, "m", heartbeat_s=10) for _ in range(2))
    nodes.node_offline(session, dead.node_name)
    first = workers.request_stop(session, account, live.id, heartbeat_s=10)
    assert first.tell_node and first.worker.status == WorkerStatus.STOPPING
    assert session.get(PoolNode, live.node_name).worker_id == live.id  # held until the node unbinds
    gone = workers.request_stop(session, account, dead.id, heartbeat_s=10)
    assert not gone.tell_node and gone.worker.status == WorkerStatus.STOPPED
    assert session.get(PoolNode, dead.node_name).worker_id is None
    again = workers.request_stop(session, account, dead.id, heartbeat_s=10)  # idempotent
    assert not again.tell_node and again.worker.status == WorkerStatus.STOPPED


def test_a_node_loads_only_its_own_live_binding(session, alice):
    account, _ = alice
    deploy(session, account, "m")
    register(session, "n1")
    register(session, "n2")
    w = workers.start_worker(session, account, "m", heartbeat_s=10)
    worker, model = workers.binding_to_load(session, w.id, w.node_name)
    assert (worker.id, model.name) == (w.id, "m")
    other = "n2" if w.node_name == "n1" else "n1"
    with pytest.raises(errors.WorkerStartFailed):
        workers.binding_to_load(session, w.id, other)
    with pytest.raises(errors.WorkerStartFailed):
        workers.binding_to_load(session, "0" * 16, w.node_name)
    workers.finish(session, w.id, WorkerStatus.STOPPED)
    assert workers.binding_to_load(session, w.id, w.node_name) is None  # a stale bind message


def test_a_query_needs_a_worker_up_unless_it_waits_for_one(session, alice):
    account, _ = alice
    model = deploy(session, account, "m", shared=True)
    token, _ = tokens.create_token(session, account, "t", "m")

    def check(**kw):
        return queries.check_query(queries.grant_for_id(session, token.id), model.id, **kw)

    with pytest.raises(errors.NoWorkerUp, match="no worker up.*wait_for_worker"):
        check()
    assert check(wait_for_worker=True).hardware == "cpu"
    register(session, "n1")
    w = workers.start_worker(session, account, "m", heartbeat_s=10)
    with pytest.raises(errors.NoWorkerUp):  # pending, then loading: not yet
        check()
    workers.mark_loading(session, w.id)
    workers.mark_running(session, w.id, {1})
    workers.set_consuming(session, w.id, True)
    assert check().serving
    workers.set_consuming(session, w.id, False)  # standby: loaded, takes no query
    assert session.get(Worker, w.id).status == WorkerStatus.STANDBY
    with pytest.raises(errors.NoWorkerUp):
        check()
    nodes.node_offline(session, "n1")
    workers.set_consuming(session, w.id, True)
    with pytest.raises(errors.NoWorkerUp):  # up, but on a node gone offline
        check()
    nodes.register_node(session, "shared1", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=2, shared=True))
    assert check().serving  # the model allows shared nodes, and one of its class is online


def test_start_refusals_name_their_reason(session, alice):
    account, _ = alice
    deploy(session, account, "off", active=False)
    with pytest.raises(errors.ModelInactive, match="activate it"):
        workers.start_worker(session, account, "off", heartbeat_s=10)
    deploy(session, account, "g", hardware="gpu")
    register(session, "n1")
    with pytest.raises(errors.NoFreeNode, match="No gpu pool node is online .*only cpu nodes are"):
        workers.start_worker(session, account, "g", heartbeat_s=10)
    deploy(session, account, "z", node_selector={"zone": "b"})
    with pytest.raises(errors.NoFreeNode, match="carries the labels zone=b"):
        workers.start_worker(session, account, "z", heartbeat_s=10)
    nodes.register_node(
        session, "n2", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=2, profile="big", labels={"zone": "b"})
    )
    with pytest.raises(errors.NoFreeNode, match="profile 'small'"):
        workers.start_worker(session, account, "z", heartbeat_s=10, profile="small")
    assert workers.start_worker(session, account, "z", heartbeat_s=10, profile="big").node_name == "n2"
    deploy(session, account, "one", max_workers=1)
    workers.start_worker(session, account, "one", heartbeat_s=10)
    with pytest.raises(errors.WorkerLimit, match="at most 1"):
        workers.start_worker(session, account, "one", heartbeat_s=10)
    deploy(session, account, "many")
    with pytest.raises(errors.NoFreeNode, match="2 worker\\(s\\) asked .* only 0 of the 2"):
        workers.start_workers(session, account, "many", heartbeat_s=10, count=2)
    with pytest.raises(errors.InvalidInput):
        workers.start_workers(session, account, "many", heartbeat_s=10, count=0)


def test_a_user_stop_keeps_the_minimum_other_reasons_do_not(session, alice):
    account, _ = alice
    deploy(session, account, "m", min_workers=1)
    register(session, "n1")
    w = workers.start_worker(session, account, "m", heartbeat_s=10)
    with pytest.raises(errors.BelowMinimum, match="min-workers 0"):
        workers.request_stop(session, account, w.id, heartbeat_s=10)
    decision = workers.request_stop(session, account, w.id, heartbeat_s=10, reason=StopReason.CREDITS)
    assert (decision.worker.status, decision.worker.stop_reason) == (WorkerStatus.STOPPING, "credits depleted")


def test_the_node_listing_shows_capacity_and_hides_other_accounts_bindings(session, alice):
    account, _ = alice
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, account, "m")
    nodes.register_node(
        session,
        "n1",
        nodes.NodeInfo(
            host_class="cpu",
            concurrency=2,
            threads=1,
            pid=1,
            cores=4,
            memory_bytes=8 << 30,
            key_cache_bytes=2 << 30,
            labels={"a": "1"},
        ),
    )
    w = workers.start_worker(session, account, "m", heartbeat_s=10)
    (mine,) = nodes.list_nodes(session, 10, account.id)
    assert (mine.model, mine.worker_id, mine.busy, mine.labels) == ("m", w.id, True, {"a": "1"})
    assert (mine.capacity.slots, mine.capacity.cores, mine.allocatable.slots, mine.allocatable.cores) == (2, 4, 0, 0)
    assert mine.allocatable.memory_bytes == 6 << 30  # the key cache is reserved
    (theirs,) = nodes.list_nodes(session, 10, bob.id)
    assert (theirs.model, theirs.worker_id, theirs.worker_status, theirs.busy) == (None, None, None, True)
    node = session.get(PoolNode, "n1")
    node.last_seen = utcnow() - timedelta(seconds=31)
    session.add(node)
    assert nodes.list_nodes(session, 10)[0].status == "lost"


GPU_ARTIFACT = models.Artifact("c" * 64, "g" * 64, 100, 200, V, backend="gpu")


def test_a_circuit_compiled_for_the_gpu_runs_only_where_concrete_has_its_gpu_build(session, alice):
    account, _ = alice
    # Refused on cpu nodes: its keys fit the GPU compilation only
    with pytest.raises(errors.InvalidDeployment, match="compiled for the GPU .* --hardware gpu"):
        models.deploy_model(session, account, "c", GPU_ARTIFACT, hardware="cpu")
    deploy(session, account, "cpu-model")
    with pytest.raises(errors.InvalidDeployment, match="compiled for the GPU"):
        models.add_version(session, account, "cpu-model", GPU_ARTIFACT)
    model = models.deploy_model(session, account, "g", GPU_ARTIFACT, hardware="gpu", max_workers=4)
    models.set_status(session, account, "g", ModelStatus.ACTIVE)
    assert models.current_version(session, model).backend == "gpu"
    assert models.describe_version(model, models.current_version(session, model)).backend == "gpu"
    with pytest.raises(errors.InvalidInput, match="compiled for the GPU"):
        models.update_settings(session, account, "g", {"hardware": "cpu"})
    # A gpu node without the GPU build is not offered, and the refusal says why
    register(session, "plain", host_class="gpu")
    with pytest.raises(errors.NoFreeNode, match="none of the 1 online gpu node.* GPU build"):
        workers.start_worker(session, account, "g", heartbeat_s=10)
    nodes.register_node(
        session, "built", nodes.NodeInfo(host_class="gpu", concurrency=1, threads=1, pid=2, gpus=1, capabilities=("cpu", "gpu"))
    )
    assert workers.start_worker(session, account, "g", heartbeat_s=10).node_name == "built"
    listed = {n.name: n for n in nodes.list_nodes(session, heartbeat_s=10)}
    assert (listed["built"].gpu_build, listed["plain"].gpu_build) == (True, False)
    # A model compiled for the CPU may still use a plain gpu node
    deploy(session, account, "gc", hardware="gpu")
    assert workers.start_worker(session, account, "gc", heartbeat_s=10).node_name == "plain"


def test_a_gpu_version_is_not_rolled_onto_workers_whose_nodes_cannot_run_it(session, alice):
    account, _ = alice
    deploy(session, account, "g", hardware="gpu")
    register(session, "plain", host_class="gpu")
    worker = workers.start_worker(session, account, "g", heartbeat_s=10)
    with pytest.raises(errors.ModelBusy, match=f"{worker.id} on plain"):
        models.add_version(session, account, "g", GPU_ARTIFACT)
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    model = models.add_version(session, account, "g", GPU_ARTIFACT)  # no worker: it serves at once
    assert (model.version, models.current_version(session, model).backend) == (2, "gpu")
    with pytest.raises(errors.NoFreeNode, match="GPU build"):
        workers.start_worker(session, account, "g", heartbeat_s=10)
    models.rollback(session, account, "g")  # back on version 1, compiled for the CPU
    worker = workers.start_worker(session, account, "g", heartbeat_s=10)
    assert worker.node_name == "plain"
    # A model moved to cpu nodes cannot roll back onto its GPU version
    workers.finish(session, worker.id, WorkerStatus.STOPPED)
    models.update_settings(session, account, "g", {"hardware": "cpu"})
    with pytest.raises(errors.InvalidDeployment, match="compiled for the GPU"):
        models.rollback(session, account, "g", to=2)
    assert models.get_model(session, account, "g").version == 1


def test_shared_nodes_count_for_a_gpu_version_only_with_the_gpu_build(session, alice):
    account, _ = alice
    model = models.deploy_model(session, account, "g", GPU_ARTIFACT, hardware="gpu", shared=True)
    nodes.register_node(session, "shared-plain", nodes.NodeInfo(host_class="gpu", concurrency=1, threads=1, pid=1, shared=True))
    assert queries.serving_models(session, [model.id]) == ({}, set())
    nodes.register_node(
        session,
        "shared-built",
        nodes.NodeInfo(host_class="gpu", concurrency=1, threads=1, pid=2, shared=True, capabilities=("cpu", "gpu")),
    )
    assert queries.serving_models(session, [model.id]) == ({}, {model.id})
