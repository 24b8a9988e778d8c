"""A model's autoscaling policy through the gateway: the HTTP API, ``ManagementClient`` and
`cipherpool model autoscale`, against the app under uvicorn (in a thread, on a free loopback
port) with its own Redis and a SQLite database. The decisions themselves are tested in
test_autoscale.py; another account's model is also a case of tests/security/test_isolation.py."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli

DEFAULTS = {
    "target_queue_wait_s": 5.0,
    "target_queue_depth": None,
    "scale_up_after_s": 30.0,
    "idle_after_s": 300.0,
    "cooldown_up_s": 60.0,
    "cooldown_down_s": 300.0,
}
SETTINGS = tuple(DEFAULTS)


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

    tmp = tmp_path_factory.mktemp("autoscale-api")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, redis_url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(
            data_dir=tmp / "data",
            broker_url=redis_url,
            token_rate_per_s=0,
            account_rate_per_s=0,
            management_timeout_s=10,
            autoscale_interval_s=5.0,
        )
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
    id: str
    key: str


def provider(gw: Gateway, *model_names: str, max_workers: int = 3) -> Provider:
    """A fresh account with inactive models of these names (1..max_workers workers)."""
    from cipherpool.db import session_scope
    from cipherpool.services import accounts, models
    from tests.test_management import artifact

    with session_scope(gw.db) as session:
        account, key = accounts.create_account(session, f"auto-{uuid.uuid4().hex[:8]}")
        for name in model_names:
            models.deploy_model(session, account, name, artifact(), min_workers=1, max_workers=max_workers)
        return Provider(account.id, key)


def call(gw: Gateway, p: Provider, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {p.key}"}, timeout=10, **kwargs)


def settings_of(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in SETTINGS}


def typed_error(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    return str(body["message"])


# ---- HTTP -----------------------------------------------------------------------------------


def test_a_model_without_a_policy_shows_the_defaults_off(gateway: Gateway):
    p = provider(gateway, "m")
    answer = call(gateway, p, "GET", "/v1/models/m/autoscale")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model"], body["enabled"], body["min_workers"], body["max_workers"], body["workers"]) == ("m", False, 1, 3, 0)
    assert settings_of(body) == DEFAULTS
    assert body["last_action"] is body["last_scaled_at"] is body["updated_at"] is body["above_since"] is None


def test_put_turns_it_on_keeps_what_is_left_out_and_delete_turns_it_off(gateway: Gateway):
    p = provider(gateway, "m")
    on = call(gateway, p, "PUT", "/v1/models/m/autoscale", json={"target_queue_depth": 4, "scale_up_after_s": 10})
    assert on.status_code == 200, on.text
    assert on.json()["enabled"] is True and on.json()["updated_at"] is not None
    assert settings_of(on.json()) == {**DEFAULTS, "target_queue_depth": 4, "scale_up_after_s": 10.0}

    # A field left out keeps its value; null clears a target.
    changed = call(gateway, p, "PUT", "/v1/models/m/autoscale", json={"target_queue_wait_s": None, "cooldown_up_s": 5})
    assert settings_of(changed.json()) == {
        **DEFAULTS,
        "target_queue_wait_s": None,
        "target_queue_depth": 4,
        "scale_up_after_s": 10.0,
        "cooldown_up_s": 5.0,
    }
    off = call(gateway, p, "DELETE", "/v1/models/m/autoscale")
    assert off.status_code == 200 and off.json()["enabled"] is False
    assert settings_of(off.json()) == settings_of(changed.json())  # kept for next time
    assert call(gateway, p, "GET", "/v1/models/m/autoscale").json() == off.json()
    again = call(gateway, p, "PUT", "/v1/models/m/autoscale", json={})
    assert again.json()["enabled"] is True and settings_of(again.json()) == settings_of(changed.json())

    events = [e["message"] for e in call(gateway, p, "GET", "/v1/models/m/events").json() if e["kind"] == "settings_changed"]
    assert len(events) == 4 and events[2] == "autoscaling off"
    assert events[0] == (
        "autoscaling on: add a worker after 10 s of queue wait > 5 s or > 4 waiting per worker, "
        "remove one after 300 s idle; cool-downs 60 s up, 300 s down"
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"target_queue_wait_s": None}, "needs a target"),
        ({"target_queue_wait_s": 0}, "target_queue_wait_s"),
        ({"target_queue_depth": 0}, "target_queue_depth"),
        ({"target_queue_wait_s": -1}, "target_queue_wait_s"),
        ({"scale_up_after_s": -5}, "scale_up_after_s"),
        ({"idle_after_s": 0}, "idle_after_s"),
        ({"cooldown_up_s": 4.9}, "at least the autoscaling interval (5 s)"),
        ({"cooldown_down_s": 1}, "cooldown_down_s must be at least"),
        ({"cooldown_down_s": 86401}, "cooldown_down_s"),
        ({"enabled": True}, "enabled"),
        ({"target_queue_depth": "many"}, "target_queue_depth"),
    ],
    ids=[
        "no-target",
        "zero-wait",
        "zero-depth",
        "negative-wait",
        "negative-delay",
        "zero-idle",
        "short-cool-down-up",
        "short-cool-down-down",
        "over-a-day",
        "unknown-field",
        "not-a-number",
    ],
)
def test_a_policy_that_cannot_work_is_refused_and_nothing_changes(gateway: Gateway, body, says):
    p = provider(gateway, "m")
    message = typed_error(call(gateway, p, "PUT", "/v1/models/m/autoscale", json=body), 422, "invalid_input")
    assert says in message
    assert call(gateway, p, "GET", "/v1/models/m/autoscale").json()["enabled"] is False


def test_an_unknown_or_another_accounts_model_is_not_found_alike(gateway: Gateway):
    bob, alice = provider(gateway, "bobs"), provider(gateway, "mine")
    call(gateway, bob, "PUT", "/v1/models/bobs/autoscale", json={"target_queue_depth": 2})
    for method, body in (("GET", None), ("PUT", {"target_queue_depth": 9}), ("DELETE", None)):
        theirs = call(gateway, alice, method, "/v1/models/bobs/autoscale", json=body)
        nowhere = call(gateway, alice, method, "/v1/models/nothing/autoscale", json=body)
        message = typed_error(theirs, 404, "model_not_found")
        assert message.replace("bobs", "X") == typed_error(nowhere, 404, "model_not_found").replace("nothing", "X")
    bobs = call(gateway, bob, "GET", "/v1/models/bobs/autoscale").json()
    assert (bobs["enabled"], bobs["target_queue_depth"]) == (True, 2)  # untouched


def test_the_answer_shows_what_the_autoscaler_did_last(gateway: Gateway):
    from sqlmodel import select

    from cipherpool.clock import utcnow
    from cipherpool.db import session_scope
    from cipherpool.db.tables import AutoscalePolicy, Model

    p = provider(gateway, "m")
    call(gateway, p, "PUT", "/v1/models/m/autoscale", json={})
    with session_scope(gateway.db) as session:
        model_id = session.exec(select(Model.id).where(Model.account_id == p.id)).one()
        policy = session.get(AutoscalePolicy, model_id)
        policy.last_scaled_at, policy.last_action, policy.last_reason = utcnow(), "up", "queue wait 9.0 s > target 5 s"
        policy.above_since = utcnow()
        session.add(policy)
    body = call(gateway, p, "GET", "/v1/models/m/autoscale").json()
    assert (body["last_action"], body["last_reason"]) == ("up", "queue wait 9.0 s > target 5 s")
    assert body["last_scaled_at"].endswith("+00:00") and body["above_since"] is not None


# ---- ManagementClient --------------------------------------------------------------------------


def test_the_management_client_sets_shows_and_turns_it_off(gateway: Gateway):
    from cipherpool.client import ManagementClient
    from cipherpool.errors import InvalidInput, ModelNotFound

    p = provider(gateway, "m")
    mc = ManagementClient(p.key, gateway.url, settings=gateway.settings)
    try:
        assert mc.get_autoscale("m").enabled is False
        on = mc.set_autoscale("m", target_queue_depth=3, idle_after_s=120, cooldown_down_s=60)
        assert (on.enabled, on.target_queue_wait_s, on.target_queue_depth, on.idle_after_s, on.cooldown_down_s) == (
            True,
            5.0,
            3,
            120.0,
            60.0,
        )
        cleared = mc.set_autoscale("m", target_queue_wait_s=None)  # None clears a target; the rest stays
        assert (cleared.target_queue_wait_s, cleared.target_queue_depth, cleared.idle_after_s) == (None, 3, 120.0)
        with pytest.raises(InvalidInput, match="needs a target"):
            mc.set_autoscale("m", target_queue_depth=None)
        assert mc.disable_autoscale("m").enabled is False
        assert mc.get_autoscale("m").target_queue_depth == 3
        with pytest.raises(ModelNotFound):
            mc.get_autoscale("nothing")
    finally:
        mc.close()


# ---- the CLI ---------------------------------------------------------------------------------


def cli_run(gw: Gateway, p: Provider, *args: str, expect: int = 0) -> Any:
    result = CliRunner().invoke(cli, ["--url", gw.url, "--api-key", p.key, "model", "autoscale", *args])
    assert result.exit_code == expect, result.output
    return result


def test_the_cli_shows_sets_clears_and_turns_it_off(gateway: Gateway):
    p = provider(gateway, "m")
    shown = cli_run(gateway, p, "m")
    assert "enabled: False" in shown.output and "target_queue_wait_s: 5.0" in shown.output

    on = json.loads(
        cli_run(
            gateway,
            p,
            "m",
            "--target-wait",
            "2s",
            "--target-depth",
            "3",
            "--up-after",
            "10s",
            "--idle-after",
            "1m",
            "--cooldown-up",
            "20s",
            "--cooldown-down",
            "1m30s",
            "--json",
        ).stdout
    )
    assert on["enabled"] is True and settings_of(on) == {
        "target_queue_wait_s": 2.0,
        "target_queue_depth": 3,
        "scale_up_after_s": 10.0,
        "idle_after_s": 60.0,
        "cooldown_up_s": 20.0,
        "cooldown_down_s": 90.0,
    }
    cleared = json.loads(cli_run(gateway, p, "m", "--target-wait", "off", "--json").stdout)
    assert (cleared["target_queue_wait_s"], cleared["target_queue_depth"], cleared["idle_after_s"]) == (None, 3, 60.0)

    off = cli_run(gateway, p, "--json", "m", "--off")
    assert json.loads(off.stdout)["enabled"] is False
    assert json.loads(cli_run(gateway, p, "m", "--json").stdout)["target_queue_depth"] == 3


@pytest.mark.parametrize(
    ("args", "expect", "says"),
    [
        (["--off", "--target-wait", "5s"], 2, "--off takes no other option"),
        (["--target-wait", "soon"], 2, "not a duration"),
        (["--target-depth", "0"], 2, "not a count of 1 or more"),
        (["--target-depth", "lots"], 2, "or `off` to clear this target"),
        (["--idle-after", "-1m"], 2, "idle-after"),
        (["--cooldown-up", "1s"], 6, "error [invalid_input]: --cooldown-up must be at least the autoscaling interval"),
        (["--target-wait", "off", "--target-depth", "off"], 6, "needs a target"),
    ],
    ids=["off-and-more", "bad-duration", "zero-depth", "bad-depth", "negative", "short-cool-down", "no-target"],
)
def test_the_cli_refuses_what_cannot_work(gateway: Gateway, args, expect, says):
    p = provider(gateway, "m")
    result = cli_run(gateway, p, "m", *args, expect=expect)
    assert says in result.output
    assert json.loads(cli_run(gateway, p, "m", "--json").stdout)["enabled"] is False


def test_the_cli_names_an_unknown_model(gateway: Gateway, tmp_path: Path):
    p = provider(gateway)
    result = cli_run(gateway, p, "nothing", expect=4)
    assert "error [model_not_found]" in result.output
