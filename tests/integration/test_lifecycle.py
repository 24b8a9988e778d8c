"""Worker lifecycle on a pool of nodes with different profiles (issue 8), end to end.

Three real `celery worker` nodes started from one profiles file: two cpu nodes with
different labels (zone a and b) and one node declared `gpu` (no GPU needed: the class is a
routing matter). Checked through the gateway, as a provider and an end user would:
listing nodes with capacity, routing by class, two workers of one model both serving, standby
and resume, a start refused with each reason, a query with no worker up, a failed load, and
the worker's log.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import select

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.celery import create_app
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.db.tables import Model, ModelVersion, PoolNode, Worker
from cipherpool.dispatch import send_to_node
from cipherpool.names import BIND_TASK
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.statuses import WorkerStatus
from cipherpool.waiting import wait_until
from cipherpool.workers.capacity import concrete_gpu_available
from tests.integration.helpers import node_of

pytestmark = pytest.mark.integration

PROFILES = """
[profiles.cpu-a]
host_class = "cpu"
concurrency = 1
threads = 1
key_cache = "2GiB"
labels = { zone = "a" }

[profiles.cpu-b]
host_class = "cpu"
concurrency = 1
threads = 1
labels = { zone = "b" }

[profiles.gpu-small]
host_class = "gpu"
concurrency = 2
threads = 1
labels = { zone = "a" }

[profiles.shared-cpu]
host_class = "cpu"
concurrency = 1
threads = 1
shared = true
model_cache = "4GiB"
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    (root / "profiles.toml").write_text(PROFILES)
    settings = Settings(
        data_dir=root / "platform", profiles_file=root / "profiles.toml", query_timeout_s=120, auth_cache_ttl_s=5.0
    )
    stack = EmbeddedStack(
        settings, StackOptions(profiles=["cpu-a", "cpu-b", "gpu-small", "shared-cpu"], beat=False, flower=False)
    )
    with stack:
        mc = ManagementClient(stack.create_account("pool-provider"), settings=stack.client_settings)
        yield stack, mc
        mc.close()


@pytest.fixture
def deployed(pool, examples):
    """Deploy (and activate) a model under a fresh name; stop its workers afterwards."""
    stack, mc = pool
    made: list[str] = []

    def deploy(example: str, name: str, activate: bool = True, **settings) -> str:
        mc.deploy_model(name, examples[example].path, **settings)
        if activate:
            mc.activate_model(name)
        made.append(name)
        return name

    yield deploy
    for name in made:
        for worker in mc.list_workers(name):
            if worker.status.value in ("pending", "loading", "up", "standby"):
                mc.update_model(name, min_workers=0)
                mc.stop_worker(worker.id)


def client(pool, name: str, tmp_path, **kw) -> QueryClient:
    stack, mc = pool
    qc = QueryClient(mc.create_token(f"{name}-user", model=name), settings=stack.client_settings, key_dir=tmp_path, **kw)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    return qc


def test_nodes_report_profile_class_labels_and_capacity(pool):
    stack, mc = pool
    nodes = {n.profile: n for n in mc.list_nodes()}
    assert set(nodes) == {"cpu-a", "cpu-b", "gpu-small", "shared-cpu"}
    assert [n.shared for n in nodes.values()] == [p == "shared-cpu" for p in nodes]
    assert (nodes["gpu-small"].host_class, nodes["gpu-small"].labels) == ("gpu", {"zone": "a"})
    for node in nodes.values():
        assert node.status == "online" and node.heartbeat_age_s < 30
        assert node.capacity.cores >= 1 and node.capacity.memory_bytes > 2**28
        assert node.allocatable == node.capacity  # nothing bound yet
    assert (nodes["gpu-small"].capacity.slots, nodes["cpu-a"].capacity.slots) == (2, 1)
    assert (nodes["cpu-a"].threads, nodes["gpu-small"].threads) == (1, 1)


def test_a_gpu_model_runs_on_the_gpu_node_only(pool, deployed, examples, tmp_path):
    stack, mc = pool
    name = deployed("cancer", "cancer-gpu", hardware="gpu")
    worker = mc.start_worker(name)
    assert worker.node.startswith("node3-gpu-small") and worker.status == WorkerStatus.UP

    # Its queries carry the gpu routing key: the gpu node answers them, no cpu node sees them.
    qc = client(pool, name, tmp_path)
    x = examples["cancer"].x_test[:3]
    handles = [qc.submit(qc.encrypt(row)) for row in x]
    outputs = [qc.decrypt(h.result(120)) for h in handles]
    np.testing.assert_allclose(np.concatenate(outputs), examples["cancer"].clear(x), atol=1e-6)
    assert {node_of(stack, h) for h in handles} == {worker.node}

    # The node listing shows it bound, with nothing left to allocate.
    gpu = next(n for n in mc.list_nodes() if n.name == worker.node)
    assert (gpu.model, gpu.worker_id, gpu.allocatable.slots) == (name, worker.id, 0)

    # A second start finds no free gpu node, and says so (cpu nodes are free, not eligible).
    mc.update_model(name, max_workers=2)
    with pytest.raises(errors.NoFreeNode, match="only 0 of the 1 gpu node"):
        mc.start_worker(name)


def test_a_node_refuses_a_model_of_another_class_whatever_the_message(pool, deployed):
    """The claim never picks a cpu node for a gpu model; and a node asked anyway refuses."""
    stack, mc = pool
    name = deployed("digits", "digits-gpu-forced", hardware="gpu")
    url = stack.settings.effective_database_url()
    with session_scope(url) as session:
        model = session.exec(select(Model).where(Model.name == name)).one()
        node = session.exec(select(PoolNode).where(PoolNode.profile == "cpu-b")).one()
        worker = Worker(account_id=model.account_id, model_id=model.id, node_name=node.name)
        session.add(worker)
        node.worker_id = worker.id
        session.add(node)
    app = create_app(stack.settings.model_copy(update={"broker_url": stack.broker_url}))
    try:
        send_to_node(app, node.name, BIND_TASK, worker_id=worker.id)
        failed = wait_until(lambda: (w := mc.get_worker(worker.id)).status == WorkerStatus.FAILED and w, 60, interval_s=0.2)
    finally:
        app.close()
    assert "cpu node and the model needs a gpu node" in failed.error
    assert any("load failed" in line.message for line in mc.worker_logs(worker.id))
    assert next(n for n in mc.list_nodes() if n.name == node.name).busy is False  # freed


def user_client(pool, name: str, user: str, tmp_path) -> QueryClient:
    """An end user of its own (a token and a key set of its own)."""
    stack, mc = pool
    key_dir = tmp_path / user
    key_dir.mkdir()
    qc = QueryClient(mc.create_token(f"{name}-{user}", model=name), settings=stack.client_settings, key_dir=key_dir)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    return qc


def test_two_workers_of_one_model_both_serve(pool, deployed, examples, tmp_path):
    stack, mc = pool
    name = deployed("cancer", "cancer-two", max_workers=2)
    workers = mc.start_workers(name, 2)
    assert {w.status for w in workers} == {WorkerStatus.UP}
    assert {w.profile for w in workers} == {"cpu-a", "cpu-b"}
    qc = client(pool, name, tmp_path)
    x = examples["cancer"].x_test[:6]
    handles = [qc.submit(qc.encrypt(row)) for row in x]
    outputs = [qc.decrypt(h.result(120)) for h in handles]
    np.testing.assert_allclose(np.concatenate(outputs), examples["cancer"].clear(x), atol=1e-6)
    assert {node_of(stack, h) for h in handles} == {w.node for w in workers}  # both took queries

    # The maximum is enforced; a user may not stop below the minimum.
    with pytest.raises(errors.WorkerLimit, match="at most 2"):
        mc.start_worker(name)
    mc.update_model(name, min_workers=2)
    with pytest.raises(errors.BelowMinimum, match="min_workers"):
        mc.stop_worker(workers[0].id)


def test_each_key_sets_queries_go_to_its_node_and_a_node_on_standby_leaves_none_behind(pool, deployed, examples, tmp_path):
    """Key affinity on real nodes: each key set's queries, one at a time, all run on one node
    (its key deserialized once: every later query a hit); queries in flight when a key set's
    node goes on standby are all answered, by the other node, and none is left in its queue."""
    from cipherpool.names import affinity_queue

    stack, mc = pool
    name = deployed("cancer", "cancer-affinity", max_workers=2)
    workers = mc.start_workers(name, 2)
    x = examples["cancer"].x_test[:4]
    clear = examples["cancer"].clear(x)
    homes = []
    for user in range(3):
        qc = user_client(pool, name, f"user-{user}", tmp_path)
        handles = []
        for row in x:
            handle = qc.submit(qc.encrypt(row))
            handles.append(handle)
            np.testing.assert_allclose(qc.decrypt(handle.result(120)), clear[len(handles) - 1 : len(handles)], atol=1e-6)
        ran_on = {node_of(stack, h) for h in handles}
        assert len(ran_on) == 1, f"key set of user {user} left its node: {ran_on}"
        assert [h.key_cache for h in handles[1:]] == ["hit"] * (len(x) - 1)
        homes.append(ran_on.pop())
    # (Which node each key set gets depends on the key sets active at the time: tests/test_affinity.py.)

    def counted():  # the nodes' own count of where each query came from, read as a provider
        window = mc.model_stats(name, window_s=300)[0].window
        return window if window.affinity_routed + window.affinity_fallbacks >= 3 * len(x) else None

    window = wait_until(counted, 20)
    assert (window.affinity_routed, window.affinity_fallbacks) == (3 * len(x), 0)  # one at a time: never past the bound

    # In flight on the key set's node when it goes on standby: none is left in its queue.
    home = homes[-1]
    handles = [qc.submit(qc.encrypt(row)) for row in examples["cancer"].x_test[:8]]
    mc.standby_worker(next(w.id for w in workers if w.node == home))
    outputs = [qc.decrypt(h.result(120)) for h in handles]
    np.testing.assert_allclose(np.concatenate(outputs), examples["cancer"].clear(examples["cancer"].x_test[:8]), atol=1e-6)
    with session_scope(stack.platform_settings.effective_database_url()) as session:
        model = session.exec(select(Model).where(Model.name == name)).one()
        queue = affinity_queue(model.hardware, model.id, home)
    from redis import Redis

    broker = Redis.from_url(stack.broker_url)
    try:
        assert broker.llen(queue) == 0
    finally:
        broker.close()


def test_standby_and_resume(pool, deployed, examples, tmp_path):
    stack, mc = pool
    name = deployed("digits", "digits-standby", node_selector={"zone": "b"})
    worker = mc.start_worker(name, standby=True)
    assert worker.status == WorkerStatus.STANDBY and worker.profile == "cpu-b"
    qc = client(pool, name, tmp_path)
    x = examples["digits"].x_test[0]

    # On standby it takes no query: refused at submit, unless the caller waits for a worker.
    with pytest.raises(errors.NoWorkerUp, match="no worker up"):
        qc.predict(x)
    handle = qc.submit(qc.encrypt(x), wait_for_worker=True)

    t0 = time.perf_counter()
    resumed = mc.resume_worker(worker.id)
    resume_s = time.perf_counter() - t0
    assert resumed.status == WorkerStatus.UP
    assert np.argmax(qc.decrypt(handle.result(120))) == np.argmax(examples["digits"].clear(x[None])[0])
    assert np.argmax(qc.predict(x)) == np.argmax(examples["digits"].clear(x[None])[0])
    print(f"resume from standby: {resume_s * 1000:.0f} ms (no model load)")

    assert mc.standby_worker(worker.id).status == WorkerStatus.STANDBY
    with pytest.raises(errors.NoWorkerUp):
        qc.predict(x)
    kinds = [e.kind for e in mc.model_events(name)]
    assert kinds.count("worker_standby") == 2 and "worker_resumed" in kinds


def test_start_is_refused_with_each_reason(pool, deployed):
    stack, mc = pool
    inactive = deployed("digits", "digits-inactive", activate=False)
    with pytest.raises(errors.ModelInactive, match="activate it"):
        mc.start_worker(inactive)
    nowhere = deployed("digits", "digits-nowhere", node_selector={"zone": "mars"})
    with pytest.raises(errors.NoFreeNode, match="carries the labels zone=mars"):
        mc.start_worker(nowhere)
    anywhere = deployed("digits", "digits-anywhere", max_workers=3)
    with pytest.raises(errors.NoFreeNode, match="profile 'no-such-profile'"):
        mc.start_worker(anywhere, profile="no-such-profile")
    with pytest.raises(errors.NoFreeNode, match="3 worker\\(s\\) asked .* only 2 of the 2 cpu"):
        mc.start_workers(anywhere, 3)
    assert mc.list_workers(anywhere) == []  # all or none
    with pytest.raises(errors.WorkerLimit):
        mc.start_workers(anywhere, 4)


def compiled_for_the_gpu(source: Path, target: Path) -> Path:
    """A copy of a deployment whose server.zip says ``use_gpu``, as concrete-ml saves a model
    compiled with ``device="cuda"`` (which this machine's CPU build cannot compile)."""
    shutil.copytree(source, target)
    with zipfile.ZipFile(source / "server.zip") as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    configuration = json.loads(members["configuration.json"])
    assert configuration["use_gpu"] is False
    members["configuration.json"] = json.dumps({**configuration, "use_gpu": True}).encode()
    with zipfile.ZipFile(target / "server.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return target


@pytest.mark.skipif(concrete_gpu_available(), reason="this host's concrete has the GPU build: it would run the model")
def test_a_model_compiled_for_the_gpu_needs_a_node_with_concretes_gpu_build(pool, deployed, examples, tmp_path):
    stack, mc = pool
    path = compiled_for_the_gpu(examples["cancer"].path, tmp_path / "cuda")
    with pytest.raises(errors.InvalidDeployment, match="compiled for the GPU"):
        mc.deploy_model("cancer-cuda-on-cpu", path)  # a cpu model by default
    name = f"cancer-cuda-{tmp_path.name[-8:]}"
    mc.deploy_model(name, path, hardware="gpu")
    mc.activate_model(name)
    assert [v.backend for v in mc.list_versions(name)] == ["gpu"]
    gpu = next(n for n in mc.list_nodes() if n.profile == "gpu-small")
    assert gpu.gpu_build is False  # this machine's concrete is the CPU build
    # The claim offers no node, and says what is missing.
    with pytest.raises(errors.NoFreeNode, match="compiled for the GPU .* GPU build"):
        mc.start_worker(name)
    # A gpu node asked anyway refuses it before concrete tries, and keeps serving.
    url = stack.settings.effective_database_url()
    with session_scope(url) as session:
        model = session.exec(select(Model).where(Model.name == name)).one()
        node = session.exec(select(PoolNode).where(PoolNode.profile == "gpu-small")).one()
        worker = Worker(account_id=model.account_id, model_id=model.id, node_name=node.name)
        session.add(worker)
        node.worker_id = worker.id
        session.add(node)
    app = create_app(stack.settings.model_copy(update={"broker_url": stack.broker_url}))
    try:
        send_to_node(app, node.name, BIND_TASK, worker_id=worker.id)
        failed = wait_until(lambda: (w := mc.get_worker(worker.id)).status == WorkerStatus.FAILED and w, 60, interval_s=0.2)
    finally:
        app.close()
    assert "compiled for the GPU" in failed.error and "no GPU build" in failed.error
    assert next(n for n in mc.list_nodes() if n.name == node.name).busy is False  # freed
    # The same model compiled for the CPU runs on that gpu node.
    cpu_name = deployed("cancer", f"cancer-cpu-on-gpu-{tmp_path.name[-8:]}", hardware="gpu")
    assert mc.start_worker(cpu_name).node == node.name
    assert [v.backend for v in mc.list_versions(cpu_name)] == ["cpu"]


def test_a_failed_load_is_reported_with_its_error_and_logged(pool, deployed, examples):
    stack, mc = pool
    name = deployed("digits", "digits-broken")
    # The version's server artifact is replaced by its client.zip: it passes the deploy checks
    # (it was checked as a client.zip) but no server can load it.
    with session_scope(stack.settings.effective_database_url()) as session:
        model = session.exec(select(Model).where(Model.name == name)).one()
        version = session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id)).one()
        version.server_blob = version.client_blob
        session.add(version)
    with pytest.raises(errors.WorkerStartFailed) as refused:
        mc.start_worker(name)
    (worker,) = mc.list_workers(name)
    assert worker.status == WorkerStatus.FAILED and worker.error and worker.stop_reason == "failure"
    assert worker.error in str(refused.value)
    lines = [line.message for line in mc.worker_logs(worker.id)]
    assert lines[0].startswith("pending: claimed node") and any(m.startswith("load failed") for m in lines)
    assert any(e.kind == "worker_failed" for e in mc.model_events(name))


def test_a_worker_log_tells_its_life(pool, deployed):
    stack, mc = pool
    name = deployed("digits", "digits-logged")
    worker = mc.start_worker(name)
    mc.stop_worker(worker.id)
    lines = mc.worker_logs(worker.id)
    messages = [line.message for line in lines]
    expected = ["pending: claimed node", "model digits-logged loaded in", "bound on", "stop requested (user)", "unbound from"]
    positions = [next(i for i, m in enumerate(messages) if m.startswith(prefix)) for prefix in expected]
    assert positions == sorted(positions), messages
    assert [line.n for line in lines] == list(range(len(lines)))
    assert mc.worker_logs(worker.id, after=lines[-2].n) == lines[-1:]
    assert mc.get_worker(worker.id).stop_reason == "user"


def test_shared_nodes_serve_models_that_allow_them_on_demand(pool, deployed, examples, tmp_path):
    from redis import Redis

    from cipherpool.workers.shared import execution_tally

    stack, mc = pool
    shared_node = next(n.name for n in mc.list_nodes() if n.shared)
    name = deployed("digits", "digits-shared", shared=True)
    qc = client(pool, name, tmp_path / "shared")
    x = examples["digits"].x_test[:2]
    expected = np.argmax(examples["digits"].clear(x), axis=1)

    # No dedicated worker: auto goes to the shared node, which loads the model on demand.
    handles = [qc.submit(qc.encrypt(row)) for row in x]
    assert [int(np.argmax(qc.decrypt(h.result(120)))) for h in handles] == list(expected)
    assert {node_of(stack, h) for h in handles} == {shared_node}
    model_id = mc.get_model(name).id
    redis = Redis.from_url(stack.broker_url)
    try:
        tally = execution_tally(redis, _account_id(stack, name))
    finally:
        redis.close()
    assert tally[model_id]["queries"] == 2 and tally[model_id]["seconds"] > 0  # billed per execution
    # `pool nodes` shows what the shared node holds: to its provider, and to the operator
    (listed,) = [n for n in mc.list_nodes() if n.name == shared_node]
    assert [(m.model, m.version) for m in listed.shared_models] == [(name, 1)]
    other = ManagementClient(stack.create_account(f"other-{tmp_path.name[-8:]}"), settings=stack.client_settings)
    try:
        assert next(n for n in other.list_nodes() if n.name == shared_node).shared_models == []  # not theirs
    finally:
        other.close()
    from cipherpool.admin import Admin

    assert name in {
        m.model
        for n in Admin(stack.settings.model_copy(update={"broker_url": stack.broker_url})).list_nodes()
        if n.name == shared_node
        for m in n.shared_models
    }

    # With a dedicated worker up, auto prefers it; mode=shared still reaches the shared node.
    worker = mc.start_worker(name)
    assert int(np.argmax(qc.predict(x[0]))) == expected[0]
    dedicated = qc.submit(qc.encrypt(x[0]))
    dedicated.result(120)
    assert node_of(stack, dedicated) == worker.node
    shared = QueryClient(qc.token, settings=stack.client_settings, key_dir=tmp_path / "shared", mode="shared")
    via_shared = shared.submit(shared.encrypt(x[1]))
    assert int(np.argmax(shared.decrypt(via_shared.result(120)))) == expected[1] and node_of(stack, via_shared) == shared_node

    # A model that does not allow shared nodes is refused there, with the reason.
    private = deployed("digits", "digits-private")
    qp = client(pool, private, tmp_path / "private", mode="shared")
    with pytest.raises(errors.NoWorkerUp, match="does not allow shared nodes"):
        qp.predict(x[0])
    with pytest.raises(errors.NoWorkerUp, match="no worker up"):
        client(pool, private, tmp_path / "private-auto").predict(x[0])


def _account_id(stack, model_name: str) -> str:
    with session_scope(stack.settings.effective_database_url()) as session:
        return session.exec(select(Model.account_id).where(Model.name == model_name)).one()
