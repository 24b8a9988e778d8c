"""Alerts through the gateway: the HTTP API (`/v1/alerts`), the ManagementClient's methods and
`cipherpool alert`, against the real app under uvicorn (in a thread, on a free loopback port)
with its own Redis and a SQLite database. Events are recorded as beat records them
(:func:`cipherpool.scheduler.alerts.transition`), so the history's contents are known.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli

HOOK = "https://hooks.example.com/alerts"


@dataclass
class Gateway:
    url: str
    db: str
    settings: Any


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    import uvicorn

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor, free_port

    tmp = tmp_path_factory.mktemp("alerts-api")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, redis_url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(data_dir=tmp / "data", broker_url=redis_url, token_rate_per_s=0, account_rate_per_s=0, stats_window_s=600)
        db = s.effective_database_url()
        init_db(db)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        try:
            yield Gateway(f"http://127.0.0.1:{port}", db, s)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


@dataclass
class Provider:
    key: str
    http: httpx.Client

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"Authorization": f"Bearer {self.key}"}, **kwargs)


@pytest.fixture
def p(gateway: Gateway) -> Iterator[Provider]:
    """A fresh account with models m and n."""
    from cipherpool.db import session_scope
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models

    with session_scope(gateway.db) as session:
        account, key = accounts.create_account(session, f"alerts-{uuid.uuid4().hex[:8]}")
        for name in ("m", "n"):
            models.deploy_model(session, account, name, models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11")))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield Provider(key, http)


def fire(gateway: Gateway, rule_id: str, *values: float | None) -> list[str]:
    """Evaluate the rule on these figures, in turn, as beat would; the events recorded (their
    opaque ids, as the API shows them)."""
    from cipherpool.db import session_scope
    from cipherpool.db.tables import AlertRule, Model
    from cipherpool.scheduler.alerts import Seen, transition

    recorded = []
    for value in values:
        with session_scope(gateway.db) as session:
            rule = session.get(AlertRule, rule_id)
            event = transition(session, Seen.of(rule, session.get(Model, rule.model_id)), value, datetime.now(UTC))
            if event is not None:
                recorded.append(event.public_id)
    return recorded


# ---- HTTP ----------------------------------------------------------------------------------


def test_set_list_replace_and_remove_over_http(gateway: Gateway, p: Provider):
    body = {"model": "m", "metric": "average_query_s", "threshold": 2.5, "webhook_url": HOOK}
    made = p.call("PUT", "/v1/alerts", json=body)
    assert made.status_code == 200, made.text
    rule = made.json()
    assert (rule["created"], rule["model"], rule["window_s"], rule["state"], rule["webhook_url"]) == (
        True,
        "m",
        600,
        "ok",
        HOOK,
    )  # the platform's default window
    secret = rule["webhook_secret"]
    assert secret and len(secret) >= 43

    # The secret is in that answer only.
    listed = p.call("GET", "/v1/alerts")
    assert listed.status_code == 200 and secret not in listed.text and "webhook_secret" not in listed.text
    assert [(r["id"], r["threshold"]) for r in listed.json()] == [(rule["id"], 2.5)]

    # Set again: the same rule, a new threshold and window; the webhook and its secret kept.
    again = p.call("PUT", "/v1/alerts", json={"model": "m", "metric": "average_query_s", "threshold": 9, "window_s": 120}).json()
    assert (
        again["id"],
        again["created"],
        again["threshold"],
        again["window_s"],
        again["webhook_url"],
        again["webhook_secret"],
    ) == (rule["id"], False, 9.0, 120, HOOK, None)
    # webhook_url null removes the webhook.
    removed = p.call(
        "PUT", "/v1/alerts", json={"model": "m", "metric": "average_query_s", "threshold": 9, "webhook_url": None}
    ).json()
    assert removed["webhook_url"] is None
    p.call("PUT", "/v1/alerts", json={"model": "n", "metric": "queue_depth", "threshold": 10})
    assert [r["model"] for r in p.call("GET", "/v1/alerts", params={"model": "n"}).json()] == ["n"]
    assert len(p.call("GET", "/v1/alerts").json()) == 2

    gone = p.call("DELETE", f"/v1/alerts/{rule['id']}")
    assert gone.status_code == 204
    assert [r["model"] for r in p.call("GET", "/v1/alerts").json()] == ["n"]
    again_gone = p.call("DELETE", f"/v1/alerts/{rule['id']}")
    assert (again_gone.status_code, again_gone.json()["code"]) == (404, "alert_not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"metric": "average_query_s", "threshold": -1}, 422, "invalid_input"),
        ({"metric": "error_rate", "threshold": 1.5}, 422, "invalid_input"),
        ({"metric": "p99", "threshold": 1}, 422, "invalid_input"),
        ({"metric": "queue_depth"}, 422, "invalid_input"),
        ({"metric": "queue_depth", "threshold": 1, "window_s": 30}, 422, "invalid_input"),
        ({"metric": "queue_depth", "threshold": 1, "window_s": 90_000}, 422, "invalid_input"),
        ({"metric": "queue_depth", "threshold": 1, "webhook_url": "ftp://x.example.com/"}, 422, "invalid_input"),
        ({"metric": "queue_depth", "threshold": 1, "webhook_url": "http://127.0.0.1:6379/"}, 422, "refused_destination"),
        ({"metric": "queue_depth", "threshold": 1, "webhook_url": "http://169.254.169.254/"}, 422, "refused_destination"),
        ({"metric": "queue_depth", "threshold": 1, "severity": "high"}, 422, "invalid_input"),
        ({"model": "no-such-model", "metric": "queue_depth", "threshold": 1}, 404, "model_not_found"),
    ],
)
def test_refused_rules(gateway: Gateway, p: Provider, body: dict[str, Any], status: int, code: str):
    answer = p.call("PUT", "/v1/alerts", json={"model": "m", **body})
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert p.call("GET", "/v1/alerts").json() == []


def test_the_history_of_fired_and_cleared_alerts(gateway: Gateway, p: Provider):
    m = p.call("PUT", "/v1/alerts", json={"model": "m", "metric": "error_rate", "threshold": 0.1, "webhook_url": HOOK}).json()
    n = p.call("PUT", "/v1/alerts", json={"model": "n", "metric": "queue_depth", "threshold": 3}).json()
    ids = fire(gateway, m["id"], 0.5, 0.6, 0.05) + fire(gateway, n["id"], 7)
    assert len(ids) == 3

    history = p.call("GET", "/v1/alerts/events").json()
    assert [(e["id"], e["model"], e["kind"], e["value"], e["delivery"]) for e in history] == [
        (ids[0], "m", "fired", 0.5, "pending"),
        (ids[1], "m", "cleared", 0.05, "pending"),
        (ids[2], "n", "fired", 7.0, "none"),
    ]
    assert [e["id"] for e in p.call("GET", "/v1/alerts/events", params={"model": "m"}).json()] == ids[:2]
    assert [e["id"] for e in p.call("GET", "/v1/alerts/events", params={"limit": 2}).json()] == ids[1:]
    # The rule shows its state and last figure; removing it keeps its history.
    shown = {r["model"]: r for r in p.call("GET", "/v1/alerts").json()}
    assert (shown["m"]["state"], shown["m"]["value"], shown["n"]["state"]) == ("ok", 0.05, "firing")
    assert shown["n"]["changed_at"] and shown["n"]["evaluated_at"]
    p.call("DELETE", f"/v1/alerts/{m['id']}")
    assert len(p.call("GET", "/v1/alerts/events").json()) == 3
    refused = p.call("GET", "/v1/alerts/events", params={"limit": 0})
    assert refused.status_code == 422
    # Model events say it too.
    from cipherpool.db import session_scope
    from cipherpool.db.tables import ModelEvent

    with session_scope(gateway.db) as session:
        kinds = [e.kind for e in session.query(ModelEvent).filter(ModelEvent.model_id == m["model_id"])]
    assert kinds.count("alert_fired") == 1 and kinds.count("alert_cleared") == 1


# ---- ManagementClient ----------------------------------------------------------------------


def test_the_management_client(gateway: Gateway, p: Provider):
    from pydantic import ValidationError

    from cipherpool import errors
    from cipherpool.client import ManagementClient
    from cipherpool.statuses import AlertMetric, AlertState

    mc = ManagementClient(p.key, gateway.url, settings=gateway.settings)
    try:
        made = mc.set_alert("m", AlertMetric.CURRENT_QUERY_S, 1.5, window_s=300, webhook_url=HOOK)
        assert made.created and made.webhook_secret and made.state is AlertState.OK
        kept = mc.set_alert("m", "current_query_s", 3)  # the webhook left as it is
        assert (kept.id, kept.webhook_url, kept.webhook_secret, kept.window_s) == (made.id, HOOK, None, 300)
        rotated = mc.set_alert("m", "current_query_s", 3, new_secret=True)
        assert rotated.webhook_secret not in (None, made.webhook_secret)
        assert mc.set_alert("m", "current_query_s", 3, webhook_url=None).webhook_url is None
        assert [a.id for a in mc.list_alerts("m")] == [made.id] and mc.list_alerts("n") == []
        fire(gateway, made.id, 4.0)
        events = mc.alert_events("m")
        assert [(e.kind, e.value, e.metric) for e in events] == [("fired", 4.0, AlertMetric.CURRENT_QUERY_S)]
        mc.remove_alert(made.id)
        assert mc.list_alerts() == [] and len(mc.alert_events(limit=5)) == 1
        with pytest.raises(errors.AlertNotFound):
            mc.remove_alert(made.id)
        with pytest.raises(ValidationError):  # refused before it is sent, as every client-side check
            mc.set_alert("m", "queue_depth", -1)
        with pytest.raises(errors.InvalidInput, match="between 0 and 1"):  # refused by the gateway
            mc.set_alert("m", "error_rate", 1.5)
        with pytest.raises(errors.ModelNotFound):
            mc.set_alert("nope", "queue_depth", 1)
    finally:
        mc.close()


# ---- the CLI -------------------------------------------------------------------------------


def cli_run(gateway: Gateway, p: Provider, *args: Any, expect: int = 0) -> Any:
    result = CliRunner().invoke(cli, ["--url", gateway.url, "--api-key", p.key, *[str(a) for a in args]])
    assert result.exit_code == expect, result.output
    return result


def test_the_alert_commands(gateway: Gateway, p: Provider):
    text = cli_run(gateway, p, "alert", "set", "m", "queue_wait_s", "0.75", "--window", "10m", "--webhook", HOOK).stdout
    assert "window_s: 600" in text and "threshold: 0.75" in text and "shown once" in text
    secret = text.split("webhook_secret: ")[1].split()[0]
    assert len(secret) >= 43

    listed = json.loads(cli_run(gateway, p, "alert", "list", "--json").stdout)
    assert [(a["model"], a["metric"], a["threshold"], a["window_s"]) for a in listed] == [("m", "queue_wait_s", 0.75, 600)]
    table = cli_run(gateway, p, "alert", "list", "--model", "m").stdout
    assert table.splitlines()[0].split()[:4] == ["ID", "MODEL", "METRIC", "THRESHOLD"] and secret not in table
    again = json.loads(cli_run(gateway, p, "--json", "alert", "set", "m", "queue_wait_s", "2").stdout)
    assert (again["created"], again["threshold"], again["webhook_url"], again["webhook_secret"]) == (False, 2.0, HOOK, None)
    assert (
        json.loads(cli_run(gateway, p, "--json", "alert", "set", "m", "queue_wait_s", "2", "--no-webhook").stdout)["webhook_url"]
        is None
    )

    fire(gateway, listed[0]["id"], 5.0, None)
    events = json.loads(cli_run(gateway, p, "alert", "events", "--model", "m", "--json").stdout)
    assert [(e["kind"], e["value"]) for e in events] == [("fired", 5.0), ("cleared", None)]
    assert "cleared" in cli_run(gateway, p, "alert", "events").stdout

    assert json.loads(cli_run(gateway, p, "alert", "remove", listed[0]["id"], "--json").stdout) == {"removed": listed[0]["id"]}
    assert json.loads(cli_run(gateway, p, "alert", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["set", "m", "queue_depth", "1", "--webhook", HOOK, "--no-webhook"], 2, "not both"),
        (["set", "m", "queue_depth", "1", "--window", "90.5s"], 2, "whole number"),
        (["set", "m", "queue_depth", "1", "--window", "soon"], 2, "not a duration"),
        (["set", "m", "p99", "1"], 2, "p99"),
        (["set", "m", "queue_depth", "lots"], 2, "lots"),
        (["set", "m", "error_rate", "2"], 6, "between 0 and 1"),
        (["set", "m", "queue_depth", "1", "--window", "30s"], 6, "window_s"),
        (["set", "m", "queue_depth", "1", "--webhook", "http://10.0.0.1/"], 6, "not a public address"),
        (["set", "nope", "queue_depth", "1"], 4, "nope"),
        (["remove", "0123456789abcdef"], 4, "alert_not_found"),
        (["events", "--model", "nope"], 4, "model_not_found"),
    ],
)
def test_refused_alert_commands(gateway: Gateway, p: Provider, args: list[str], code: int, says: str):
    result = cli_run(gateway, p, "alert", *args, expect=code)
    assert says in result.output
