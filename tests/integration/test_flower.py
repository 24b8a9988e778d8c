"""Flower tells models apart (issue 10): a real Flower, started by the embedded stack, lists each
query under its model's shadow name and labels ``flower_task_runtime_seconds`` with it.

Two accounts each deploy a model named ``cancer`` (the logistic regression: milliseconds of
compute, a tiny key): acme's is served by a dedicated worker and queried through the gateway;
zeta's runs on a shared node and is queried through the gateway and through the in-cluster
Python task API (:mod:`cipherpool.tasks.submit`, in a process of its own with the platform's
environment), so every way a query is published is seen from Flower, under names that differ
only by the model id's prefix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.dispatch import query_shadow
from cipherpool.names import QUERY_TASK
from cipherpool.waiting import wait_until

pytestmark = pytest.mark.integration

PROFILES = """
[profiles.dedicated]
host_class = "cpu"
concurrency = 1
threads = 1

[profiles.shared]
host_class = "cpu"
concurrency = 1
threads = 1
shared = true
"""
IN_CLUSTER = """
import sys
from pathlib import Path
from cipherpool.tasks.submit import query_output, submit_query

handle = submit_query(sys.argv[1], Path(sys.argv[2]).read_bytes(), mode="shared")
Path(sys.argv[3]).write_bytes(query_output(handle, timeout=60))
print(handle.id)
"""


@pytest.fixture(scope="module")
def flowered(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    root = tmp_path_factory.mktemp("flower")
    (root / "profiles.toml").write_text(PROFILES)
    example = train_breast_cancer(root / "cancer")
    settings = Settings(data_dir=root / "platform", profiles_file=root / "profiles.toml", query_timeout_s=60)
    stack = EmbeddedStack(settings, StackOptions(profiles=["dedicated", "shared"], beat=False, flower=True))
    with stack:
        user, password = stack.flower_auth.split(":", 1)
        with httpx.Client(base_url=stack.flower_url, auth=(user, password), timeout=5) as flower:
            yield stack, example, flower


def _flower_metrics(flower: httpx.Client) -> dict[str, list]:
    text = flower.get("/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _listening(stack, flower: httpx.Client) -> bool:
    """Flower has heard both nodes' heartbeats: its event consumer is live, so it will see the
    queries from their first event on (events sent before it listens are lost to it)."""
    try:
        online = _flower_metrics(flower).get("flower_worker_online", [])
    except httpx.HTTPError:
        return False
    heard = {s.labels["worker"] for s in online if s.value == 1}
    return set(stack.node_names) <= heard


def _client(stack, mc: ManagementClient, name: str, path: Path, key_dir: Path, shared: bool) -> tuple[QueryClient, str]:
    """The model deployed and activated, a token for it, keys uploaded; (client, token id)."""
    mc.deploy_model(name, path, shared=shared)
    mc.activate_model(name)
    if not shared:
        mc.start_worker(name)
    created = mc.new_token(f"{name}-user", name)
    qc = QueryClient(created.token, settings=stack.client_settings, key_dir=key_dir, mode="shared" if shared else "auto")
    qc.generate_keys()
    qc.upload_evaluation_keys()
    return qc, created.id


def _in_cluster(stack, token_id: str, ciphertext: bytes, tmp_path: Path) -> tuple[str, bytes]:
    """One query through the in-cluster task API, in a process with the platform's environment."""
    (tmp_path / "in.bin").write_bytes(ciphertext)
    done = subprocess.run(
        [sys.executable, "-c", IN_CLUSTER, token_id, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1], (tmp_path / "out.bin").read_bytes()


def test_flower_shows_each_query_under_its_models_shadow_name(flowered, tmp_path):
    stack, example, flower = flowered
    wait_until(lambda: _listening(stack, flower), 60, interval_s=0.5)
    acme = ManagementClient(stack.create_account("acme"), settings=stack.client_settings)
    zeta = ManagementClient(stack.create_account("zeta"), settings=stack.client_settings)
    dedicated, _ = _client(stack, acme, "cancer", example.path, tmp_path / "acme", shared=False)
    shared, zeta_token = _client(stack, zeta, "cancer", example.path, tmp_path / "zeta", shared=True)
    names = {
        query_shadow("cancer", dedicated.model.id): "node1-dedicated",  # shadow name -> the node serving it
        query_shadow("cancer", shared.model.id): "node2-shared",
    }
    assert len(names) == 2, "one name per model, though both are called cancer"

    # When each model is queried: acme's through the gateway, zeta's through the gateway and in-cluster.
    x = example.x_test[:1]
    asked = {}
    for qc in (dedicated, shared):
        handle = qc.submit(qc.encrypt(x[0]))
        np.testing.assert_allclose(qc.decrypt(handle.result(60)), example.clear(x), atol=1e-3)
        asked[handle.id] = query_shadow("cancer", qc.model.id)
    task_id, output = _in_cluster(stack, zeta_token, shared.encrypt(x[0]), tmp_path)
    np.testing.assert_allclose(shared.decrypt(output), example.clear(x), atol=1e-3)
    asked[task_id] = query_shadow("cancer", shared.model.id)

    # Then Flower lists every query, a success, under its model's name, on the node that served it.
    def listed() -> dict | None:
        found = {i: flower.get(f"/api/task/info/{i}") for i in asked}
        infos = {i: r.json() for i, r in found.items() if r.status_code == 200}
        return infos if all(infos.get(i, {}).get("state") == "SUCCESS" for i in asked) else None

    infos = wait_until(listed, 30, interval_s=0.5)
    for task_id, name in asked.items():
        assert infos[task_id]["name"] == name, infos[task_id]
        assert infos[task_id]["worker"].startswith(names[name] + "@") and infos[task_id]["runtime"] > 0
    zetas = {i for i, n in asked.items() if n == query_shadow("cancer", shared.model.id)}
    assert set(flower.get("/api/tasks", params={"taskname": query_shadow("cancer", shared.model.id)}).json()) == zetas
    # the UI's search box takes the same query: its name, or any part of it
    assert set(flower.get("/api/tasks", params={"search": f"name:{query_shadow('cancer', shared.model.id)}"}).json()) == zetas
    assert not flower.get("/api/tasks", params={"taskname": QUERY_TASK}).json(), "no query under the bare task name"

    # And its Prometheus metrics have a runtime series per model, counting that model's queries;
    # the publishers' task-sent events (gateway and in-cluster) carry the model's name too.
    metrics = _flower_metrics(flower)
    expected = {name: list(asked.values()).count(name) for name in names}
    counts = {
        s.labels["task"]: s.value for s in metrics["flower_task_runtime_seconds"] if s.name == "flower_task_runtime_seconds_count"
    }
    assert {name: counts.get(name) for name in names} == expected and QUERY_TASK not in counts
    sent = {}
    for sample in metrics["flower_events"]:
        if sample.name == "flower_events_total" and sample.labels["type"] == "task-sent":
            sent[sample.labels["task"]] = sent.get(sample.labels["task"], 0) + sample.value
    assert {name: sent.get(name) for name in names} == expected and QUERY_TASK not in sent
    for client in (acme, zeta, dedicated, shared):
        client.close()
