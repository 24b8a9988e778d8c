"""Beat's reconciler (issue 8, self-healing): a pool node that dies is noticed, its worker
fails with the reason, and another free node of the class takes over the model."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.waiting import wait_until
from tests.integration.helpers import serve

pytestmark = pytest.mark.integration
HEARTBEAT_S = 1.0  # lost after 3 silent beats


def test_a_lost_node_is_failed_and_replaced(examples, tmp_path):
    example = examples["cancer"]
    settings = Settings(
        data_dir=tmp_path / "platform", query_timeout_s=120, node_heartbeat_s=HEARTBEAT_S, reconcile_interval_s=1.0
    )
    with EmbeddedStack(settings, StackOptions(nodes=2, beat=True, flower=False)) as stack:
        mc, qc, worker_id = serve(stack, example, "cancer", tmp_path / "keys")
        first = mc.get_worker(worker_id)
        x = example.x_test[:2]
        np.testing.assert_allclose(qc.predict(x[0]), example.clear(x[:1]), atol=1e-6)

        # When the node serving the model is killed and does not come back (host gone)
        node = next(c for c in stack.supervisor.children if c.name == first.node.split("@")[0])
        os.kill(node.pid, signal.SIGKILL)
        node.process.wait(timeout=10)
        killed = time.monotonic()

        # Then beat's reconciler fails its worker with the reason, within 3 heartbeats + a tick
        failed = wait_until(lambda: (w := mc.get_worker(worker_id)).status.value == "failed" and w, 30, interval_s=0.2)
        noticed_s = time.monotonic() - killed
        assert "lost" in (failed.error or "") and failed.stop_reason == "node lost"
        # and another node of the class serves the model
        replacement = wait_until(
            lambda: next((w for w in mc.list_workers("cancer") if w.status.value == "up"), None), 60, interval_s=0.2
        )
        assert replacement.node != first.node
        np.testing.assert_allclose(qc.predict(x[1]), example.clear(x[1:2]), atol=1e-6)
        kinds = [(e.kind, e.worker_id) for e in mc.model_events("cancer")]
        assert ("worker_failed", worker_id) in kinds and ("worker_up", replacement.id) in kinds
        print(f"\nlost node noticed after {noticed_s:.1f} s (heartbeat {HEARTBEAT_S:g} s)")
        assert noticed_s < 3 * HEARTBEAT_S + 10

        # A node that comes back finds its worker failed: it stays free, nothing runs twice.
        restarted, _ = stack.supervisor.restart_dead()
        assert restarted == [node]
        time.sleep(3 * HEARTBEAT_S)
        running = [w for w in mc.list_workers("cancer") if w.status.value == "up"]
        assert [w.id for w in running] == [replacement.id]
        qc.close()
        mc.close()
