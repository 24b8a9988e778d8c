"""Deploying a new version while queries flow, and rolling back (issue 7).

Two nodes serve one model. A client sends queries without pause while the provider deploys
version 2 (a model with other client specs), then rolls back to version 1. Every query is
answered, and each answer is exactly what the clear model of the version that computed it
says: no query is answered by a half-loaded model. A client still holding version-1 keys
after the switch gets ``KeysOutdated``, telling it to generate keys again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration
GRACE_S = 2.0  # nodes drop the old version this long after the switch (so rollback reloads it)


def _train_v2(path):
    """Version 2: the same task with 6-bit weights, so other client specs and other outputs."""
    from concrete.ml.deployment import FHEModelDev
    from concrete.ml.sklearn import LogisticRegression
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.2, random_state=0)
    model = LogisticRegression(n_bits=6)
    model.fit(x_train, y_train)
    model.compile(x_train)
    path.mkdir(parents=True)
    FHEModelDev(str(path), model).save()
    return lambda xs: model.predict_proba(xs, fhe="disable")


@dataclass
class Traffic:
    """Queries sent without pause from a thread, each answer kept with the version that computed it."""

    client: QueryClient
    x: Any
    answers: list[tuple[int, int, Any]] = field(default_factory=list)  # (row, version, probabilities)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            row = i % len(self.x)
            try:
                out = self.client.predict(self.x[row])
                self.answers.append((row, self.client.last_version or 0, out))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported by the test
                self.errors.append(exc)
            i += 1

    def versions_seen(self) -> list[int]:
        return [v for _, v, _ in self.answers]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, examples):
    settings = Settings(data_dir=tmp_path_factory.mktemp("rollout"), query_timeout_s=120, version_grace_s=GRACE_S)
    with EmbeddedStack(settings, StackOptions(nodes=2, node_concurrency=2, beat=False, flower=False)) as stack:
        mc = ManagementClient(stack.create_account("p"), settings=stack.client_settings)
        yield stack, mc
        mc.close()


def test_a_new_version_rolls_out_under_load_and_rolls_back(rollout, examples, tmp_path):
    stack, mc = rollout
    v1 = examples["cancer"]
    clear = {1: v1.clear, 2: _train_v2(tmp_path / "v2")}
    mc.deploy_model("cancer", v1.path, description="breast cancer", max_workers=2)
    mc.activate_model("cancer")
    workers = [mc.start_worker("cancer"), mc.start_worker("cancer")]
    assert len({w.node for w in workers}) == 2
    token = mc.create_token("u", model="cancer")
    settings = stack.client_settings.model_copy(update={"query_timeout_s": 120})
    traffic = Traffic(QueryClient(token, settings=settings, key_dir=tmp_path / "keys"), v1.x_test[:8])
    traffic.client.generate_keys()
    traffic.client.upload_evaluation_keys()
    stale = QueryClient(token, settings=settings, key_dir=tmp_path / "stale-keys")  # keeps version-1 keys
    stale.generate_keys()
    stale.upload_evaluation_keys()
    stale_ciphertext = stale.encrypt(v1.x_test[0])
    np.testing.assert_allclose(stale.decrypt(stale.execute(stale_ciphertext)), clear[1](v1.x_test[:1]), atol=1e-6)

    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        _wait_for_answers(traffic, 5)
        deployed = mc.deploy_version("cancer", tmp_path / "v2", note="6-bit weights")
        assert deployed.rollout_version == 2 and deployed.version == 1  # workers load it first
        model = mc.wait_for_rollout("cancer", timeout=120)
        assert (model.version, model.rollout_version) == (2, None)
        _wait_for_answers(traffic, 5, version=2)

        with pytest.raises(errors.KeysOutdated, match="generate keys again"):
            stale.execute(stale_ciphertext)

        time.sleep(GRACE_S + 2)  # the nodes drop version 1: rolling back loads it again
        assert all(s.versions == [2] for s in mc.worker_stats("cancer"))
        mc.rollback_model("cancer")
        model = mc.wait_for_rollout("cancer", timeout=120)
        assert (model.version, model.rollout_version) == (1, None)
        _wait_for_answers(traffic, 5, version=1, after=len(traffic.answers))
    finally:
        traffic.stop.set()
        thread.join(timeout=120)

    assert not traffic.errors, traffic.errors[:3]
    seen = traffic.versions_seen()
    assert 1 in seen and 2 in seen and seen[-1] == 1
    first_v2 = seen.index(2)
    assert all(v == 2 for v in seen[first_v2 : seen.index(1, first_v2)])  # no version 1 answer in between
    for row, version, out in traffic.answers:
        np.testing.assert_allclose(out, clear[version](traffic.x[row : row + 1]), atol=1e-6)

    kinds = [e.kind for e in mc.model_events("cancer")]
    for expected in (
        "deployed",
        "worker_started",
        "worker_up",
        "version_added",
        "rollout_started",
        "worker_loaded_version",
        "version_serving",
        "rolled_back",
    ):
        assert expected in kinds, (expected, kinds)
    assert kinds.count("worker_loaded_version") == 4  # two workers, two rollouts
    shown = mc.get_model("cancer")
    assert [v.number for v in shown.versions] == [1, 2] and shown.versions[0].serving
    assert shown.input_shape == [1, 30] and shown.running_workers == 2
    for w in workers:
        mc.stop_worker(w.id)
    traffic.client.close()
    stale.close()


def _wait_for_answers(traffic: Traffic, n: int, version: int | None = None, after: int = 0, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = [v for v in traffic.versions_seen()[after:] if version is None or v == version]
        if len(got) >= n or traffic.errors:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} answers (version {version}) within {timeout_s} s")


@pytest.mark.parametrize("with_broker", [True, False], ids=["broker", "heartbeat"])
def test_disabling_an_account_stops_its_workers_and_refuses_it(rollout, examples, tmp_path, with_broker):
    """With the broker at hand the operator's command tells the node at once; without it (an
    operator on the database alone) the node sees at its heartbeat that the worker is no
    longer wanted, and unbinds it."""
    from cipherpool.admin import Admin

    stack, _ = rollout
    api_key = stack.create_account(f"tenant-{with_broker}")
    mc = ManagementClient(api_key, settings=stack.client_settings)
    mc.deploy_model("cancer", examples["cancer"].path)
    mc.activate_model("cancer")
    worker = mc.start_worker("cancer")
    token = mc.create_token("u", model="cancer")
    admin_settings = stack.settings.model_copy(update={"broker_url": stack.broker_url if with_broker else None})
    admin = Admin(admin_settings)
    disabled = admin.disable_account(f"tenant-{with_broker}")
    assert disabled.account.status.value == "disabled" and disabled.workers_stopped == [worker.id]

    with pytest.raises(errors.AccountDisabled):
        mc.list_models()
    qc = QueryClient(token, settings=stack.client_settings, key_dir=tmp_path / "keys")
    with pytest.raises(errors.AccountDisabled):
        qc.model  # noqa: B018 - the request is the test

    admin.enable_account(f"tenant-{with_broker}")  # nothing was deleted: the key works again
    deadline = time.monotonic() + 3 * stack.settings.node_heartbeat_s + 10
    while (current := mc.get_worker(worker.id)).status.value != "stopped" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert current.status.value == "stopped" and current.stop_reason == "account disabled"
    assert [m.name for m in mc.list_models()] == ["cancer"]
    stopped = [e for e in mc.model_events("cancer") if e.kind == "worker_stopped"]
    assert stopped and "account disabled" in stopped[-1].message
    assert mc.start_worker("cancer").status.value == "up"  # the node was freed
    for w in mc.list_workers("cancer"):
        if w.status.value == "up":
            mc.stop_worker(w.id)
    qc.close()
    mc.close()
