"""Alerts end to end (issue 10): an alert fires, calls a local webhook receiver, and clears.

A real stack with beat evaluating the rules every second, one pool node serving the breast-
cancer model (a logistic regression: a tiny key, queries in milliseconds), and a webhook
receiver started by the test on 127.0.0.1 (the platform allows private addresses here). The
receiver answers the first call with a 500, so the fired call is delivered by the control
worker's retry. Checked: the body and its signature, the retry recorded on the event, the
model's events; then the threshold raised by setting the rule again, and the clearing
recorded and delivered too.
"""

from __future__ import annotations

import pytest

from cipherpool.alerts.signature import EVENT_HEADER, SIGNATURE_HEADER, verify
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.waiting import wait_until
from tests.webhook_receiver import Received, Receiver

pytestmark = pytest.mark.integration

PROFILES = """
[profiles.dedicated]
host_class = "cpu"
concurrency = 1
threads = 1
"""


@pytest.fixture(scope="module")
def alerting(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    root = tmp_path_factory.mktemp("alerts")
    example = train_breast_cancer(root / "cancer")
    (root / "profiles.toml").write_text(PROFILES)
    settings = Settings(
        data_dir=root / "platform",
        profiles_file=root / "profiles.toml",
        query_timeout_s=120,
        alert_interval_s=1.0,
        webhook_allow_private=True,
        webhook_backoff_s=0.5,
        webhook_attempts=4,
    )
    with EmbeddedStack(settings, StackOptions(profiles=["dedicated"], beat=True, flower=False)) as stack:
        yield stack, example


def _signed(secret: str, kind: str, received: list[Received]) -> Received | None:
    """The first call of ``kind`` whose signature verifies."""
    for call in received:
        if call.json()["kind"] == kind and verify(secret, call.headers.get(SIGNATURE_HEADER), call.body):
            return call
    return None


def test_an_alert_fires_calls_a_local_webhook_and_clears(alerting, tmp_path):
    stack, example = alerting
    mc = ManagementClient(stack.create_account("alerts"), settings=stack.client_settings)
    with Receiver([500]) as receiver:  # the first call fails: the retry must deliver it
        mc.deploy_model("cancer", example.path)
        mc.activate_model("cancer")
        mc.start_worker("cancer")
        # Given a rule that any query crosses, with a webhook,
        rule = mc.set_alert("cancer", "average_query_s", 0, window_s=60, webhook_url=receiver.url)
        assert rule.webhook_secret and rule.state == "ok"
        qc = QueryClient(mc.create_token("user", model="cancer"), settings=stack.client_settings, key_dir=tmp_path)
        qc.generate_keys()
        qc.upload_evaluation_keys()
        # when a query is computed,
        qc.predict(example.x_test[:1])

        # then beat fires it, and the control worker delivers it on its second call (after a 500),
        delivered = wait_until(lambda: [e for e in mc.alert_events("cancer") if e.delivery == "delivered"], 30)
        assert (delivered[0].kind, delivered[0].attempts, delivered[0].last_error) == ("fired", 2, None)
        assert mc.list_alerts("cancer")[0].state == "firing"
        # each call a signed "fired" body of that event.
        calls = receiver.received()
        assert len(calls) == 2 and all(_signed(rule.webhook_secret, "fired", [c]) for c in calls)
        body = calls[1].json()
        assert (body["event_id"], body["model"], body["metric"], body["threshold"], body["rule_id"]) == (
            delivered[0].id,
            "cancer",
            "average_query_s",
            0.0,
            rule.id,
        )
        assert body["value"] > 0 and calls[1].headers[EVENT_HEADER] == "fired" and calls[0].body == calls[1].body

        # When the threshold is raised above the figure (the rule set again), it clears,
        mc.set_alert("cancer", "average_query_s", 1000)
        cleared = wait_until(lambda: _signed(rule.webhook_secret, "cleared", receiver.received()), 30, interval_s=0.2)
        assert cleared.json()["threshold"] == 1000.0 and cleared.json()["value"] <= 1000
        # and the clearing is recorded, delivered at the first call.
        events = wait_until(
            lambda: (found := mc.alert_events("cancer")) and len(found) == 2 and found[1].delivery == "delivered" and found, 15
        )
        assert [(e.kind, e.attempts) for e in events] == [("fired", 2), ("cleared", 1)]
        assert mc.list_alerts("cancer")[0].state == "ok"
    kinds = [e.kind for e in mc.model_events("cancer")]
    assert kinds.count("alert_fired") == 1 and kinds.count("alert_cleared") == 1
    mc.close()
    qc.close()
