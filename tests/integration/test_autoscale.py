"""Autoscaling end to end (issue 10): a queue of slow queries makes beat's autoscaler add a
worker, and idleness removes it again.

Two pool nodes (one query at a time each), beat deciding every second, the digits MLP (about
a second a query here) with one worker of the provider's own, ``min_workers`` 1 and
``max_workers`` 2, and a policy of seconds: more than one query waiting per worker for 2 s
adds a worker; 6 s with no query and an empty queue removes one. A burst of queries queues
up; the autoscaler starts a second worker (``started_by`` autoscaler, an ``autoscaled_up``
event with its reason); every query is answered; once the queries stop, the autoscaler's
worker is stopped (``stop_reason`` autoscaler, an ``autoscaled_down`` event) and the model
stays at its one worker.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.statuses import StopReason, WorkerStatus
from cipherpool.waiting import wait_until

pytestmark = pytest.mark.integration
BURST = 10  # queries sent at once: about 10 s of work for one worker
SERVING = (WorkerStatus.PENDING, WorkerStatus.LOADING, WorkerStatus.UP, WorkerStatus.STANDBY)


def test_a_queue_of_slow_queries_adds_a_worker_and_idleness_removes_it(examples, tmp_path):
    example = examples["digits"]
    settings = Settings(data_dir=tmp_path / "platform", query_timeout_s=120, autoscale_interval_s=1.0)
    began = time.monotonic()
    with EmbeddedStack(settings, StackOptions(nodes=2, beat=True, flower=False)) as stack:
        mc = ManagementClient(stack.create_account("scaled"), settings=stack.client_settings)
        mc.deploy_model("digits", example.path, max_workers=2)
        mc.activate_model("digits")
        own = mc.start_worker("digits")  # the provider's own, started before the minimum (else beat starts one)
        assert own.status == WorkerStatus.UP
        mc.update_model("digits", min_workers=1)
        qc = QueryClient(mc.create_token("u", model="digits"), settings=stack.client_settings, key_dir=tmp_path / "keys")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        policy = mc.set_autoscale(
            "digits",
            target_queue_wait_s=3.0,
            target_queue_depth=1,
            scale_up_after_s=2,
            idle_after_s=6,
            cooldown_up_s=2,
            cooldown_down_s=2,
        )
        assert policy.enabled and (policy.min_workers, policy.max_workers, policy.workers) == (1, 2, 1)

        # When a burst of slow queries queues up behind the one worker
        x = example.x_test[:BURST]
        handles = [qc.submit(qc.encrypt(row)) for row in x]
        sent = time.monotonic()

        # Then the autoscaler adds a worker, and says why
        added = wait_until(
            lambda: next((w for w in mc.list_workers("digits") if w.started_by == "autoscaler"), None), 30, interval_s=0.25
        )
        added_after_s = time.monotonic() - sent
        assert added.id != own.id and added.node != own.node
        up_events = [e for e in mc.model_events("digits") if e.kind == "autoscaled_up"]
        assert [e.worker_id for e in up_events] == [added.id]
        assert "for " in up_events[0].message and "1 → 2 workers" in up_events[0].message
        assert "queue depth" in up_events[0].message or "queue wait" in up_events[0].message

        # and every query is answered, right
        outputs = [qc.decrypt(h.result(timeout=120)) for h in handles]
        answered_after_s = time.monotonic() - sent
        np.testing.assert_array_equal(np.argmax(np.vstack(outputs), axis=1), np.argmax(example.clear(x), axis=1))

        # When no query comes any more, the autoscaler removes its worker, and the model keeps its minimum.
        removed = wait_until(lambda: (w := mc.get_worker(added.id)).status == WorkerStatus.STOPPED and w, 40, interval_s=0.25)
        removed_after_s = time.monotonic() - sent
        assert removed.stop_reason == StopReason.AUTOSCALER.value
        down_events = [e for e in mc.model_events("digits") if e.kind == "autoscaled_down"]
        assert [e.worker_id for e in down_events] == [added.id] and "idle for" in down_events[0].message
        assert "2 → 1 workers" in down_events[0].message
        time.sleep(3)  # a few more ticks: never below min_workers
        serving = [w for w in mc.list_workers("digits") if w.status in SERVING]
        assert [w.id for w in serving] == [own.id]
        shown = mc.get_autoscale("digits")
        assert (shown.workers, shown.last_action) == (1, "down") and "idle for" in (shown.last_reason or "")
        print(
            f"\nautoscaler: added after {added_after_s:.1f} s, {BURST} queries answered after {answered_after_s:.1f} s, "
            f"removed after {removed_after_s:.1f} s; whole test {time.monotonic() - began:.0f} s"
        )
        qc.close()
        mc.close()
