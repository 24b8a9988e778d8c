"""Bindings live in the database and blobs in Redis's append-only file: stopping the whole
stack and starting it again on the same data directory brings the worker back by itself."""

import os
import signal
import time

import numpy as np
import pytest

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from tests.integration.conftest import serve

pytestmark = pytest.mark.integration


def test_a_restarted_stack_rebinds_its_workers_and_keeps_models_and_keys(examples, tmp_path):
    example = examples["cancer"]
    settings = Settings(data_dir=tmp_path / "platform", query_timeout_s=120)
    options = StackOptions(workers=1, beat=False, flower=False)
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
        assert (again.id, again.status.value, again.node_status) == (worker_id, "running", "online")

        # And when its node is killed outright, the supervisor restarts it and it rebinds.
        node = next(c for c in stack.supervisor.children if c.name == "node1")
        killed = node.pid
        os.kill(killed, signal.SIGKILL)
        node.process.wait(timeout=10)
        node.started_at -= 60  # not a crash loop
        restarted, _ = stack.supervisor.restart_dead()
        assert restarted == [node] and node.pid != killed
        np.testing.assert_allclose(qc.predict(x[0]), example.clear(x), atol=1e-3)
        qc.close()
        mc.close()


def test_a_query_on_a_killed_node_is_redelivered_to_its_replacement(examples, tmp_path):
    example = examples["digits"]
    # A short visibility timeout so that the test sees the redelivery within seconds.
    settings = Settings(data_dir=tmp_path / "platform", query_timeout_s=120, visibility_timeout_s=6)
    with EmbeddedStack(settings, StackOptions(workers=1, beat=False, flower=False)) as stack:
        mc, qc, _ = serve(stack, example, "digits", tmp_path / "keys")
        x = example.x_test[:1]

        # Given a query the node has started computing
        handle = qc.submit(qc.encrypt(x[0]))
        deadline = time.monotonic() + 30
        while handle.status() != "started" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.status() == "started"

        # When the node dies mid-query and the supervisor brings it back
        node = next(c for c in stack.supervisor.children if c.name == "node1")
        os.kill(node.pid, signal.SIGKILL)
        node.process.wait(timeout=10)
        node.started_at -= 60
        stack.supervisor.restart_dead()

        # Then the query is redelivered to the new node and the client gets its answer
        np.testing.assert_allclose(qc.decrypt(handle.result(timeout=90)), example.clear(x), atol=1e-3)
        qc.close()
        mc.close()
