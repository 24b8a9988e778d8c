"""Worker schedules through the real gateway: the HTTP API in-process (``TestClient``, its own
Redis on a free loopback port, SQLite and PostgreSQL), then `cipherpool schedule` and the
ManagementClient against the app under uvicorn (in a thread) on SQLite. Beat's side is
tests/test_schedules.py; here a schedule is defined, shown, paused, resumed and removed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlmodel import select

from cipherpool.cli import cli

OFFICE = {"start_cron": "0 8 * * 1-5", "stop_cron": "0 20 * * 1-5", "timezone": "Europe/Paris"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Provider:
    id: str
    key: str
    token: str  # an end user's access token of this account


def new_account(db: str, *model_names: str, max_workers: int = 3) -> Provider:
    """A fresh account with active models of these names (and a token for the first)."""
    from cipherpool.db import session_scope
    from cipherpool.db.tables import ModelStatus
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models, tokens

    with session_scope(db) as session:
        account, key = accounts.create_account(session, f"sched-{uuid.uuid4().hex[:8]}")
        for name in model_names:
            artifact = models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11"))
            models.deploy_model(session, account, name, artifact, max_workers=max_workers)
            models.set_status(session, account, name, ModelStatus.ACTIVE)
        _, token = tokens.create_token(session, account, "t", list(model_names[:1]))
        return Provider(account.id, key, token)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class Api:
    client: Any
    db: str
    settings: Any

    def call(self, key: str, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.request(method, path, headers={**bearer(key), **(headers or {})}, **kwargs)

    def ok(self, key: str, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        answer = self.call(key, method, path, **kwargs)
        assert answer.status_code == status, f"{method} {path} -> {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    def refused(self, key: str, method: str, path: str, status: int, code: str, **kwargs: Any) -> str:
        answer = self.call(key, method, path, **kwargs)
        assert (answer.status_code, answer.json()["code"]) == (status, code), f"{method} {path}: {answer.text}"
        return str(answer.json()["message"])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from tests.conftest import _postgres_database

    tmp = tmp_path_factory.mktemp(f"schedules-{request.param}")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        with _postgres_database() if request.param == "postgresql" else _nothing() as pg:
            s = Settings(data_dir=tmp / "data", broker_url=url, database_url=pg, token_rate_per_s=0, account_rate_per_s=0)
            db = s.effective_database_url()
            init_db(db)
            with TestClient(create_app(s), raise_server_exceptions=False) as client:
                yield Api(client, db, s)
            get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


def test_create_show_list_pause_resume_and_remove(api):
    p = new_account(api.db, "digits", "other")
    made = api.ok(p.key, "POST", "/v1/schedules", 201, json={"model": "digits", "workers": 2, "name": "office", **OFFICE})
    assert {k: made[k] for k in ("model", "kind", "workers", "timezone", "name", "paused", "running_workers")} == {
        "model": "digits",
        "kind": "cron",
        "workers": 2,
        "timezone": "Europe/Paris",
        "name": "office",
        "paused": False,
        "running_workers": 0,
    }
    assert made["next_start"] is not None and made["next_stop"] is not None and made["last_actions"] == []
    start = datetime.fromisoformat(made["next_start"]).astimezone(ZoneInfo("Europe/Paris"))
    assert (start.hour, start.minute, start.isoweekday() <= 5) == (8, 0, True)
    reserved = api.ok(
        p.key,
        "POST",
        "/v1/schedules",
        201,
        json={"model": "other", "starts_at": "2031-01-01T09:00:00+01:00", "ends_at": "2031-01-01T12:00:00"},
    )
    assert (reserved["kind"], reserved["starts_at"], reserved["ends_at"]) == (
        "once",
        "2031-01-01T08:00:00+00:00",
        "2031-01-01T12:00:00+00:00",
    )  # an offset kept, none taken as UTC

    assert api.ok(p.key, "GET", f"/v1/schedules/{made['id']}") == made
    assert [s["id"] for s in api.ok(p.key, "GET", "/v1/schedules")] == [made["id"], reserved["id"]]
    assert [s["id"] for s in api.ok(p.key, "GET", "/v1/schedules", params={"model": "other"})] == [reserved["id"]]
    paused = api.ok(p.key, "POST", f"/v1/schedules/{made['id']}/pause")
    assert (paused["paused"], paused["next_start"], paused["next_stop"]) == (True, None, None)
    resumed = api.ok(p.key, "POST", f"/v1/schedules/{made['id']}/resume")
    assert (resumed["paused"], resumed["next_start"]) == (False, made["next_start"])
    assert api.call(p.key, "DELETE", f"/v1/schedules/{made['id']}").status_code == 204
    api.refused(p.key, "GET", f"/v1/schedules/{made['id']}", 404, "schedule_not_found")
    api.refused(p.key, "DELETE", f"/v1/schedules/{made['id']}", 404, "schedule_not_found")
    assert [s["id"] for s in api.ok(p.key, "GET", "/v1/schedules")] == [reserved["id"]]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"start_cron": "0 8 * *", "stop_cron": "0 20 * * *"}, "five fields"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 25 * * *"}, "out of range"),
        ({**OFFICE, "timezone": "Europe/Atlantis"}, "Unknown time zone"),
        ({**OFFICE, "workers": 4}, "max_workers"),
        ({**OFFICE, "workers": 0}, "workers"),
        ({**OFFICE, "every": "day"}, "every"),
        ({**OFFICE, "starts_at": "2031-01-01T08:00:00Z", "ends_at": "2031-01-01T09:00:00Z"}, "not both"),
        ({"starts_at": "2031-01-01T09:00:00Z", "ends_at": "2031-01-01T08:00:00Z"}, "after its starts_at"),
        ({"starts_at": "2001-01-01T08:00:00Z", "ends_at": "2001-01-01T09:00:00Z"}, "past"),
        ({}, "needs start_cron and stop_cron"),
    ],
    ids=[
        "four-fields",
        "hour-25",
        "zone",
        "above-max-workers",
        "no-workers",
        "unknown-field",
        "both-kinds",
        "backwards",
        "past",
        "nothing",
    ],
)
def test_invalid_schedules_are_refused_with_what_to_change(api, body, says):
    p = new_account(api.db, "digits")
    message = api.refused(p.key, "POST", "/v1/schedules", 422, "invalid_input", json={"model": "digits", **body})
    assert says in message
    assert api.ok(p.key, "GET", "/v1/schedules") == []


def test_refusals_of_another_kind(api):
    p = new_account(api.db, "digits")
    api.refused(p.key, "POST", "/v1/schedules", 404, "model_not_found", json={"model": "nope", **OFFICE})
    api.refused(p.key, "GET", "/v1/schedules", 404, "model_not_found", params={"model": "nope"})
    api.refused(p.key, "GET", "/v1/schedules/not-an-id", 422, "invalid_input")
    api.refused(p.token, "GET", "/v1/schedules", 403, "wrong_credential")  # an end user's token is no API key
    api.refused(p.token, "POST", "/v1/schedules", 403, "wrong_credential", json={"model": "digits", **OFFICE})
    big = json.dumps({"model": "digits", **OFFICE, "name": "x" * api.settings.max_json_bytes})
    api.refused(
        p.key, "POST", "/v1/schedules", 413, "payload_too_large", content=big, headers={"content-type": "application/json"}
    )
    assert api.ok(p.key, "GET", "/v1/schedules") == []


def test_removing_a_schedule_stops_its_running_workers(api):
    from cipherpool.db import session_scope
    from cipherpool.db.tables import Account, ModelEvent, Worker, WorkerStatus
    from cipherpool.services import nodes
    from cipherpool.services import workers as worker_service

    p = new_account(api.db, "digits")
    made = api.ok(p.key, "POST", "/v1/schedules", 201, json={"model": "digits", **OFFICE})
    node = f"node-{uuid.uuid4().hex[:6]}@test"
    with session_scope(api.db) as s:
        nodes.register_node(s, node, nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
        s.flush()
        (worker,) = worker_service.start_workers(
            s, s.get(Account, p.id), "digits", 10, started_by="schedule", schedule_id=made["id"]
        )
    assert api.ok(p.key, "GET", f"/v1/schedules/{made['id']}")["running_workers"] == 1
    assert api.call(p.key, "DELETE", f"/v1/schedules/{made['id']}").status_code == 204
    with session_scope(api.db) as s:
        row = s.get(Worker, worker.id)
        assert row.status == WorkerStatus.STOPPING and row.stop_reason == "schedule"
        kinds = [e.kind for e in s.exec(select(ModelEvent).where(ModelEvent.account_id == p.id))]
        assert "schedule_stopped" in kinds
        worker_service.finish(s, worker.id, WorkerStatus.STOPPED)  # as its node would, freeing it


# ---- the CLI and the ManagementClient --------------------------------------------------------


@dataclass
class Served:
    url: str
    db: str


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    import uvicorn

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor, free_port

    tmp = tmp_path_factory.mktemp("cli-schedules")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, redis_url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(data_dir=tmp / "data", broker_url=redis_url, token_rate_per_s=0, account_rate_per_s=0)
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
            yield Served(f"http://127.0.0.1:{port}", db)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


def run(served: Served, key: str, *args: Any, expect: int = 0, stdin: str | None = None) -> str:
    result = CliRunner().invoke(cli, ["--url", served.url, "--api-key", key, *[str(a) for a in args]], input=stdin)
    assert result.exit_code == expect, result.output
    return result.output


def test_the_schedule_commands(served):
    p = new_account(served.db, "digits")
    made = json.loads(
        run(
            served,
            p.key,
            "schedule",
            "add",
            "digits",
            "--start",
            "0 8 * * 1-5",
            "--stop",
            "0 20 * * 1-5",
            "--tz",
            "Europe/Paris",
            "--workers",
            "2",
            "--json",
        )
    )
    assert (made["start_cron"], made["stop_cron"], made["workers"], made["timezone"]) == (
        "0 8 * * 1-5",
        "0 20 * * 1-5",
        2,
        "Europe/Paris",
    )
    reserved = json.loads(
        run(
            served,
            p.key,
            "--json",
            "schedule",
            "reserve",
            "digits",
            "--from",
            "2031-05-01T10:00+02:00",
            "--to",
            "2031-05-01T18:00",
        )
    )
    assert (reserved["starts_at"], reserved["ends_at"]) == ("2031-05-01T08:00:00+00:00", "2031-05-01T18:00:00+00:00")

    table = run(served, p.key, "schedule", "list")
    assert table.splitlines()[0].split()[:4] == ["ID", "NAME", "MODEL", "WHEN"]
    assert "0 8 * * 1-5 -> 0 20 * * 1-5" in table and reserved["id"] in table
    assert [s["id"] for s in json.loads(run(served, p.key, "schedule", "list", "--model", "digits", "--json"))] == [
        made["id"],
        reserved["id"],
    ]
    shown = run(served, p.key, "schedule", "show", made["id"])
    assert f"id: {made['id']}" in shown and "next_start: " in shown and "last actions" not in shown
    assert "paused: True" in run(served, p.key, "schedule", "pause", made["id"])
    assert json.loads(run(served, p.key, "schedule", "resume", made["id"], "--json"))["paused"] is False

    assert "Aborted" in run(served, p.key, "schedule", "remove", made["id"], stdin="n\n", expect=1)
    assert json.loads(run(served, p.key, "schedule", "remove", made["id"], "--yes", "--json")) == {"removed": made["id"]}
    gone = run(served, p.key, "schedule", "show", made["id"], expect=4)
    assert "error [schedule_not_found]" in gone


def test_refusals_on_the_command_line(served):
    p = new_account(served.db, "digits")
    bad = run(served, p.key, "schedule", "add", "digits", "--start", "0 8 * *", "--stop", "0 20 * * *", expect=6)
    assert "error [invalid_input]" in bad and "five fields" in bad
    zone = run(
        served, p.key, "schedule", "add", "digits", "--start", "0 8 * * *", "--stop", "0 20 * * *", "--tz", "CET+1", expect=6
    )
    assert "Unknown time zone" in zone
    assert "workers" in run(
        served, p.key, "schedule", "reserve", "digits", "--from", "2031-01-01", "--to", "2031-01-02", "--workers", "0", expect=2
    )  # click's range check, before any request
    assert "model_not_found" in run(served, p.key, "schedule", "list", "--model", "nope", expect=4)


def test_the_management_client(served):
    from cipherpool import ManagementClient
    from cipherpool.errors import InvalidInput, ScheduleNotFound

    p = new_account(served.db, "digits")
    with_client = ManagementClient(p.key, url=served.url)
    try:
        made = with_client.create_schedule(
            "digits", start_cron="30 2 * * *", stop_cron="0 4 * * *", timezone="Europe/Paris", workers=1, profile="standard"
        )
        assert (made.profile, made.kind.value) == ("standard", "cron")
        soon = datetime.now(UTC) + timedelta(hours=1)
        reserved = with_client.reserve_workers("digits", soon.replace(tzinfo=None), soon + timedelta(hours=2), 2)
        assert datetime.fromisoformat(reserved.starts_at or "") == soon  # a naive time is UTC
        assert [s.id for s in with_client.list_schedules()] == [made.id, reserved.id]
        assert with_client.pause_schedule(made.id).paused and not with_client.resume_schedule(made.id).paused
        assert with_client.get_schedule(reserved.id).next_stop == (soon + timedelta(hours=2)).isoformat()
        with_client.remove_schedule(reserved.id)
        with pytest.raises(ScheduleNotFound):
            with_client.get_schedule(reserved.id)
        with pytest.raises(InvalidInput, match="or starts_at and ends_at"):
            with_client.create_schedule("digits", starts_at=soon, ends_at=None, workers=1)
    finally:
        with_client.close()
