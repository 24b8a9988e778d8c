"""Bindings live in the database and blobs in Redis's append-only file: stopping the whole
stack and starting it again on the same data directory brings the worker back by itself."""

import os
import signal
import time

import httpx
import numpy as np
import pytest

from cipherpool.api.schemas import WorkerStats
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.waiting import wait_until
from tests.integration.helpers import serve

pytestmark = pytest.mark.integration


def test_a_restarted_stack_rebinds_its_workers_and_keeps_models_and_keys(examples, tmp_path):
    example = examples["cancer"]
    settings = Settings(data_dir=tmp_path / "platform", query_timeout_s=120)
    options = StackOptions(nodes=1, beat=False, flower=False)
    x = example.x_test[:1]

    # Given a stack serving a model, with a client that uploaded its key
    with EmbeddedStack(settings, options) as stack:
        mc, qc, worker_id = serve(stack, example, "cancer", tmp_path / "keys")
        api_key, token = mc.api_key, qc.token
        np.testing.assert_allclose(qc.predict(x[0]), example.clear(x), atol=1e-3)
        qc.close()
        mc.close()

    # When every process is stopped and started again (Redis and the gateway on new ports)
    with EmbeddedStack(settings, options) as stack:
        # (found through the stack file that the new `up` wrote, as a user on this machine would)
        client_settings = Settings(data_dir=settings.data_dir, query_timeout_s=120)
        mc = ManagementClient(api_key, settings=client_settings)
        qc = QueryClient(token, settings=client_settings, key_dir=tmp_path / "keys")
        # Then the same client queries without redeploying, restarting or re-uploading anything
        np.testing.assert_allclose(qc.predict(x[0]), example.clear(x), atol=1e-3)
        [again] = mc.list_workers("cancer")
        assert (again.id, again.status.value, again.node_status) == (worker_id, "up", "online")

        # And when its node is killed outright, the supervisor restarts it and it rebinds.
        node = next(c for c in stack.supervisor.children if c.name == "node1")
        killed = node.pid
        os.kill(killed, signal.SIGKILL)
        node.process.wait(timeout=10)
        restarted, _ = stack.supervisor.restart_dead()
        assert restarted == [node] and node.pid != killed
        np.testing.assert_allclose(qc.predict(x[0]), example.clear(x), atol=1e-3)
        qc.close()
        mc.close()


def test_a_query_on_a_killed_node_is_redelivered_to_its_replacement(examples, tmp_path):
    example = examples["digits"]
    # A short visibility timeout so that the test sees the redelivery within seconds.
    settings = Settings(
        data_dir=tmp_path / "platform", query_timeout_s=120, visibility_timeout_s=10, metrics_token="restart-metrics-token"
    )
    with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)) as stack:
        mc, qc, _ = serve(stack, example, "digits", tmp_path / "keys")
        x = example.x_test[:1]

        # Given a query the node has started computing
        handle = qc.submit(qc.encrypt(x[0]))
        wait_until(lambda: handle.status() == "started", 30, interval_s=0.05)

        # When the node dies mid-query and the supervisor brings it back
        node = next(c for c in stack.supervisor.children if c.name == "node1")
        os.kill(node.pid, signal.SIGKILL)
        node.process.wait(timeout=10)
        killed_at = time.time()
        restarted, _ = stack.supervisor.restart_dead()
        assert restarted == [node]

        # Then the query is redelivered to the new node and the client gets its answer
        np.testing.assert_allclose(qc.decrypt(handle.result(timeout=90)), example.clear(x), atol=1e-3)
        # and it was the replacement that answered: a process started after the kill, whose
        # worker has run exactly this one query, which waited out the visibility timeout.
        # (The node's lifetime figures are the operator's: a provider's view has none.)
        [stats] = mc.worker_stats("digits")
        assert stats.node_lifetime is None
        operator = httpx.get(
            f"{stack.gateway_url}/v1/platform/nodes/{stats.node}/stats",
            timeout=30,
            headers={"Authorization": "Bearer restart-metrics-token"},
        )
        assert operator.status_code == 200, operator.text
        lifetime = WorkerStats.model_validate(operator.json()).node_lifetime
        assert lifetime is not None and lifetime.since > killed_at
        assert (stats.queries_succeeded, lifetime.queries_succeeded) == (1, 1)
        assert handle.timings["queue_wait_s"] >= settings.visibility_timeout_s - 1
        qc.close()
        mc.close()
