"""Tenant isolation: one account never sees, changes, uses or learns of another's objects.

Two provider accounts share one platform (a real Redis, a SQLite database, the gateway app
in-process). Account A then runs every operation it has, through the HTTP API, against
account B's models, versions, tokens, workers, staged uploads, evaluation keys, queries and
events. Each one must be refused as "not found" (or, for an end-user token, "not for this
model") with exactly the answer it gets for an object that exists nowhere (the name or id
echoed in the message apart), so that A cannot even learn that B's object exists; and
afterwards neither B's objects nor A's are changed (a refused operation does nothing).

``test_every_route_has_an_isolation_case`` walks the app's routes (its OpenAPI document): a new route without an
isolation case (or a written reason why it touches no other account's object) fails it.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from cipherpool.messages import ITEM, EncryptedInput, pack_batch
from cipherpool.names import QUERY_OWNER_PREFIX
from tests.helpers import value_ciphertext, versions_json, zip_bytes

# ---- the two accounts' artifacts --------------------------------------------------------


def _client_zip(tag: str) -> bytes:
    """A valid client.zip; ``tag`` makes its content (so its sha256) unique."""
    return zip_bytes(
        {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json(), "tag.txt": tag}
    )


def _server_zip(tag: str) -> bytes:
    return zip_bytes({"versions.json": versions_json(), "tag.txt": tag})


def capnp(words: int) -> bytes:
    """A well-framed Cap'n Proto message of ``words`` 8-byte words (an evaluation key's framing)."""
    return (0).to_bytes(4, "little") + words.to_bytes(4, "little") + b"\x07" * (8 * words)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


B_V1 = (_client_zip("bob v1"), _server_zip("bob v1"))
B_V2 = (_client_zip("bob v2"), _server_zip("bob v2"))
B_STAGED = (_client_zip("bob staged"), _server_zip("bob staged"))
A_V1 = (_client_zip("alice v1"), _server_zip("alice v1"))
A_STAGED = (_client_zip("alice staged"), _server_zip("alice staged"))

B_MODEL, A_MODEL, TWIN = "bob-model", "alice-model", "twin"
B_KEY, A_KEY = "b0" * 16, "a0" * 16
# B's credits: figures that appear nowhere else, so that a leak of them shows.
B_CHARGE_MICRO, B_PURCHASE, B_ORDER = 1_234_567, "77.777777", "bob-order-1"

# What exists nowhere, of each kind: A's answer for one of B's objects must equal its answer
# for one of these (the name or id echoed in the message apart).
GHOST = {
    "model": "no-such-model",
    "model_id": "feedbeeffeedbeef",
    "token": "0123456789abcdef",
    "worker": "fedcba9876543210",
    "key": "0f" * 16,
    "query": str(uuid.UUID(int=1)),
    "client_upload": sha(b"never uploaded: client"),
    "server_upload": sha(b"never uploaded: server"),
    "schedule": "5c4edb1e5c4edb1e",
    "alert": "a1e47a1e47a1e47a",
}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


# ---- the platform ------------------------------------------------------------------------


@dataclass
class World:
    client: Any
    redis: Any
    db: str
    a_key: str  # A's API key
    b_key: str
    a_token: str  # A's access token (clear value), assigned to A_MODEL
    b_token: str
    a: dict[str, str]  # A's ids: model, model_id, token
    b: dict[str, str]  # B's objects, keyed like GHOST
    b_query: str = ""
    b_before: dict[str, Any] = field(default_factory=dict)
    b_purchase: dict[str, Any] = field(default_factory=dict)

    def call(self, who: str, method: str, path: str, **kwargs: Any) -> Any:
        credential = {"a": self.a_key, "b": self.b_key, "a_token": self.a_token, "b_token": self.b_token}[who]
        return self.client.request(method, path, headers=bearer(credential), **kwargs)

    def ok(self, who: str, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.call(who, method, path, **kwargs)
        assert answer.status_code < 300, f"{who} {method} {path} -> {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    def state(self, who: str) -> dict[str, Any]:
        """Everything the account's API key (and its token) shows: models with their details,
        versions and events, tokens, workers, the account; plus, from the platform itself,
        its evaluation keys and query ownership.

        The gateway's refusal counts are written first, so a refusal counted for a model of
        B's would show as a ``refusals`` event in B's log. A's own refusals are A's (each of
        its refused attempts counts for A's model): left out of A's log."""
        from sqlmodel import col, select

        from cipherpool.db import session_scope
        from cipherpool.db.tables import EvaluationKey

        self.client.app.state.gw.refusals.flush()
        models = self.ok(who, "GET", "/v1/models")
        out: dict[str, Any] = {
            "account": self.ok(who, "GET", "/v1/account"),
            "models": models,
            "tokens": self.ok(who, "GET", "/v1/tokens"),
            "workers": self.ok(who, "GET", "/v1/workers"),
            "schedules": self.ok(who, "GET", "/v1/schedules"),
            "alerts": self.ok(who, "GET", "/v1/alerts"),
            "alert events": self.ok(who, "GET", "/v1/alerts/events"),
            "end_user": self.ok(f"{who}_token", "GET", "/v1/client/models"),
            "end_user_keys": self.ok(f"{who}_token", "GET", "/v1/client/keys"),
            # the balance and the ledger (not the burn figures: they move with the clock)
            "balance": self.ok(who, "GET", "/v1/credits")["balance"],
            "ledger": self.ok(who, "GET", "/v1/credits/history"),
        }
        for m in models:
            name = m["name"]
            out[f"model {name}"] = self.ok(who, "GET", f"/v1/models/{name}")
            out[f"versions {name}"] = self.ok(who, "GET", f"/v1/models/{name}/versions")
            events = self.ok(who, "GET", f"/v1/models/{name}/events")
            out[f"events {name}"] = [e for e in events if who == "b" or e["kind"] != "refusals"]
            out[f"autoscale {name}"] = self.ok(who, "GET", f"/v1/models/{name}/autoscale")
        token_ids = [t["id"] for t in out["tokens"]]
        with session_scope(self.db) as session:
            keys = session.exec(select(EvaluationKey).where(col(EvaluationKey.token_id).in_(token_ids))).all()
            out["keys"] = sorted((k.token_id, k.key_id, k.model_id, k.blob_id, k.client_blob) for k in keys)
        if who == "b":
            out["query owner"] = self.redis.get(QUERY_OWNER_PREFIX + self.b_query)
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    import redis
    from fastapi.testclient import TestClient

    from cipherpool.billing import ledger
    from cipherpool.clock import utcnow
    from cipherpool.config.settings import Settings
    from cipherpool.db import init_db, session_scope
    from cipherpool.db.tables import ModelStatus
    from cipherpool.fhe.deployment import Versions
    from cipherpool.gateway.app import create_app
    from cipherpool.services import accounts, models, nodes, tokens, workers
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.statuses import LedgerKind
    from cipherpool.store import BlobKind, BlobStore

    tmp = tmp_path_factory.mktemp("isolation")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis")
        s = Settings(data_dir=tmp / "data", broker_url=url, token_rate_per_s=0, account_rate_per_s=0, management_timeout_s=2)
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)
        versions = Versions.installed()

        def artifact(pair: tuple[bytes, bytes]) -> models.Artifact:
            client, server = pair
            blobs = store.put(BlobKind.CLIENT_ZIP, client), store.put(BlobKind.SERVER_ZIP, server)
            return models.Artifact(blobs[0], blobs[1], len(client), len(server), versions)

        with session_scope(db) as session:
            # B first: a lookup by name alone (not by account) would find B's objects.
            bob, b_key = accounts.create_account(session, "bob")
            alice, a_key = accounts.create_account(session, "alice")
            b_model = models.deploy_model(session, bob, B_MODEL, artifact(B_V1), description="bob's", max_workers=2)
            models.add_version(session, bob, B_MODEL, artifact(B_V2), note="second")  # no worker: serves at once
            models.set_status(session, bob, B_MODEL, ModelStatus.ACTIVE)
            models.deploy_model(session, bob, TWIN, artifact(B_V1), description="bob's twin")
            b_tok, b_token = tokens.create_token(session, bob, "bob-t", [B_MODEL, TWIN])
            nodes.register_node(session, "node-b@test", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=None, pid=1))
            # A free node too, so that a start that got past authorisation would visibly succeed.
            nodes.register_node(session, "node-free@test", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=None, pid=2))
            session.flush()
            b_worker = workers.start_worker(session, bob, B_MODEL, s.node_heartbeat_s)
            workers.mark_running(session, b_worker.id, {2})
            workers.set_consuming(session, b_worker.id, True)
            # B's worker charged for an hour of today (so of this month), as the beat charges it:
            # usage has a row per day, and B's figures are asserted as one row (in the first hour
            # of a UTC day, the hour before fell on yesterday: two rows, CI failed at 00:30).
            hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
            if hour.date() != utcnow().date():
                hour += timedelta(hours=1)
            ledger.append(
                session,
                bob.id,
                LedgerKind.RUNTIME,
                -B_CHARGE_MICRO,
                f"worker:{b_worker.id}:test",
                at=hour + timedelta(minutes=1),
                model_id=b_model.id,
                worker_id=b_worker.id,
                node="node-b@test",
                period_start=hour,
                period_end=hour + timedelta(minutes=1),
                quantity_ms=60_000,
                rate=B_CHARGE_MICRO * 60,
            )

            # B's model autoscales: turning it off, changing it or reading it would show.
            from cipherpool.services import autoscale as autoscale_policies

            autoscale_policies.set_policy(session, bob, B_MODEL, {"target_queue_depth": 3}, s.autoscale_interval_s)

            a_model = models.deploy_model(session, alice, A_MODEL, artifact(A_V1), description="alice's")
            models.set_status(session, alice, A_MODEL, ModelStatus.ACTIVE)
            models.deploy_model(session, alice, TWIN, artifact(A_V1), description="alice's twin")
            a_tok, a_token = tokens.create_token(session, alice, "alice-t", A_MODEL)
            a = {"model": A_MODEL, "model_id": a_model.id, "token": a_tok.id}
            b = {"model": B_MODEL, "model_id": b_model.id, "token": b_tok.id, "worker": b_worker.id, "key": B_KEY}
            # B's worker schedule: its windows (New Year's morning, UTC) stay put while the tests run.
            from cipherpool.scheduler import schedules

            b["schedule"] = schedules.create_schedule(
                session, bob, B_MODEL, start_cron="0 8 1 1 *", stop_cron="0 9 1 1 *", workers=2
            ).id
            # B's alert rule with a webhook, fired once (as beat records it).
            from cipherpool.alerts import rules
            from cipherpool.scheduler import alerts as evaluate

            b_alert = rules.set_rule(
                session, bob, B_MODEL, "average_query_s", 1.0, webhook_url="https://bob.example.com/hook"
            ).rule
            evaluate.transition(session, evaluate.Seen.of(b_alert, b_model), 2.5, utcnow())
            b["alert"] = b_alert.id
        store.redis.close()

        app = create_app(s)
        with TestClient(app, raise_server_exceptions=False) as client:
            w = World(client, redis.Redis.from_url(url), db, a_key, b_key, a_token, b_token, a, b)
            # Each account's staged uploads, evaluation key; B's query in flight (no node takes it).
            for who, pair in (("b", B_STAGED), ("a", A_STAGED)):
                ids = [w.ok(who, "PUT", "/v1/uploads", content=data)["upload_id"] for data in pair]
                (b if who == "b" else a).update(client_upload=ids[0], server_upload=ids[1])
            w.ok("b_token", "PUT", f"/v1/client/keys/{B_KEY}", params={"model": B_MODEL}, content=capnp(4))
            w.ok("a_token", "PUT", f"/v1/client/keys/{A_KEY}", content=capnp(5))
            envelope = EncryptedInput(b["model_id"], B_KEY, value_ciphertext(payload=bytes(range(96)))).encode()
            w.b_query = w.ok("b_token", "POST", "/v1/queries", content=envelope)["id"]
            b["query"] = w.b_query
            w.b_purchase = w.ok(
                "b",
                "POST",
                "/v1/credits/purchases",
                json={"amount": B_PURCHASE, "idempotency_key": B_ORDER, "note": "bob's order"},
            )
            assert set(b) == set(GHOST)
            w.b_before = w.state("b")
            assert w.b_before["query owner"] is not None
            assert [x["status"] for x in w.b_before["workers"]] == ["up"]
            yield w
            w.redis.close()
    finally:
        supervisor.stop_all(grace_s=5)


# ---- the operations --------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    path: str
    json: Any = None
    params: dict[str, str] | None = None
    content: bytes | None = None


@dataclass(frozen=True)
class Case:
    """One operation of A's on B's objects: ``build(target, a)`` makes the request from the
    target ids (B's, or GHOST's) and A's own ids."""

    name: str
    method: str
    route: str  # the route's path template, as the OpenAPI document has it
    build: Callable[[dict[str, str], dict[str, str]], Req]
    code: str  # the expected error code
    status: int = 404
    who: str = "a"  # "a": A's API key; "a_token": A's access token

    def __str__(self) -> str:
        return self.name


def _env(model_id: str, key_id: str) -> bytes:
    return EncryptedInput(model_id, key_id, value_ciphertext()).encode()


M, T, W = "model_not_found", "token_not_found", "worker_not_found"
S = "schedule_not_found"
CASES = [
    # models and their versions, settings, status and events
    Case("show model", "GET", "/v1/models/{name}", lambda t, a: Req(f"/v1/models/{t['model']}"), M),
    Case(
        "update model",
        "PATCH",
        "/v1/models/{name}",
        lambda t, a: Req(f"/v1/models/{t['model']}", json={"description": "pwned", "max_workers": 7}),
        M,
    ),
    Case(
        "update model hardware",
        "PATCH",
        "/v1/models/{name}",
        lambda t, a: Req(f"/v1/models/{t['model']}", json={"hardware": "gpu"}),
        M,
    ),
    Case("delete model", "DELETE", "/v1/models/{name}", lambda t, a: Req(f"/v1/models/{t['model']}"), M),
    Case("list versions", "GET", "/v1/models/{name}/versions", lambda t, a: Req(f"/v1/models/{t['model']}/versions"), M),
    Case(
        "deploy version with A's uploads",
        "POST",
        "/v1/models/{name}/versions",
        lambda t, a: Req(
            f"/v1/models/{t['model']}/versions", json={"client_upload": a["client_upload"], "server_upload": a["server_upload"]}
        ),
        M,
    ),
    Case(
        "deploy version with B's uploads",
        "POST",
        "/v1/models/{name}/versions",
        lambda t, a: Req(
            f"/v1/models/{t['model']}/versions", json={"client_upload": t["client_upload"], "server_upload": t["server_upload"]}
        ),
        M,
    ),
    Case(
        "deploy version of A's model with B's uploads",
        "POST",
        "/v1/models/{name}/versions",
        lambda t, a: Req(
            f"/v1/models/{a['model']}/versions", json={"client_upload": t["client_upload"], "server_upload": t["server_upload"]}
        ),
        "upload_not_found",
    ),
    Case(
        "deploy model with B's uploads",
        "POST",
        "/v1/models",
        lambda t, a: Req(
            "/v1/models", json={"name": "stolen", "client_upload": t["client_upload"], "server_upload": t["server_upload"]}
        ),
        "upload_not_found",
    ),
    Case(
        "deploy model with B's server upload",
        "POST",
        "/v1/models",
        lambda t, a: Req(
            "/v1/models", json={"name": "stolen", "client_upload": a["client_upload"], "server_upload": t["server_upload"]}
        ),
        "upload_not_found",
    ),
    Case("rollback", "POST", "/v1/models/{name}/rollback", lambda t, a: Req(f"/v1/models/{t['model']}/rollback", json={}), M),
    Case(
        "rollback to version 1",
        "POST",
        "/v1/models/{name}/rollback",
        lambda t, a: Req(f"/v1/models/{t['model']}/rollback", json={"version": 1}),
        M,
    ),
    Case("activate", "POST", "/v1/models/{name}/activate", lambda t, a: Req(f"/v1/models/{t['model']}/activate"), M),
    Case("deactivate", "POST", "/v1/models/{name}/deactivate", lambda t, a: Req(f"/v1/models/{t['model']}/deactivate"), M),
    Case("events", "GET", "/v1/models/{name}/events", lambda t, a: Req(f"/v1/models/{t['model']}/events"), M),
    Case(
        "events after",
        "GET",
        "/v1/models/{name}/events",
        lambda t, a: Req(f"/v1/models/{t['model']}/events", params={"after": "ev_" + "0" * 16}),
        M,
    ),
    Case(
        "events since",
        "GET",
        "/v1/models/{name}/events",
        lambda t, a: Req(f"/v1/models/{t['model']}/events", params={"since": "2000-01-01T00:00:00Z", "limit": "5"}),
        M,
    ),
    # autoscaling
    Case("show autoscaling", "GET", "/v1/models/{name}/autoscale", lambda t, a: Req(f"/v1/models/{t['model']}/autoscale"), M),
    Case(
        "change autoscaling",
        "PUT",
        "/v1/models/{name}/autoscale",
        lambda t, a: Req(f"/v1/models/{t['model']}/autoscale", json={"target_queue_depth": 1, "scale_up_after_s": 0}),
        M,
    ),
    Case(
        "turn autoscaling off", "DELETE", "/v1/models/{name}/autoscale", lambda t, a: Req(f"/v1/models/{t['model']}/autoscale"), M
    ),
    # tokens
    Case("show token", "GET", "/v1/tokens/{token_id}", lambda t, a: Req(f"/v1/tokens/{t['token']}"), T),
    Case(
        "disable token",
        "PATCH",
        "/v1/tokens/{token_id}",
        lambda t, a: Req(f"/v1/tokens/{t['token']}", json={"enabled": False}),
        T,
    ),
    Case(
        "rename token, zero quota",
        "PATCH",
        "/v1/tokens/{token_id}",
        lambda t, a: Req(f"/v1/tokens/{t['token']}", json={"name": "pwned", "quota": 0}),
        T,
    ),
    Case("expire token", "PATCH", "/v1/tokens/{token_id}", lambda t, a: Req(f"/v1/tokens/{t['token']}", json={"ttl_s": 1}), T),
    Case("delete token", "DELETE", "/v1/tokens/{token_id}", lambda t, a: Req(f"/v1/tokens/{t['token']}"), T),
    Case("revoke token", "POST", "/v1/tokens/{token_id}/revoke", lambda t, a: Req(f"/v1/tokens/{t['token']}/revoke"), T),
    Case(
        "assign B's token to A's model",
        "POST",
        "/v1/tokens/{token_id}/models",
        lambda t, a: Req(f"/v1/tokens/{t['token']}/models", json={"model": a["model"]}),
        T,
    ),
    Case(
        "assign A's token to B's model",
        "POST",
        "/v1/tokens/{token_id}/models",
        lambda t, a: Req(f"/v1/tokens/{a['token']}/models", json={"model": t["model"]}),
        M,
    ),
    Case(
        "assign B's token to B's model",
        "POST",
        "/v1/tokens/{token_id}/models",
        lambda t, a: Req(f"/v1/tokens/{t['token']}/models", json={"model": t["model"]}),
        T,
    ),
    Case(
        "unassign B's token from A's model",
        "DELETE",
        "/v1/tokens/{token_id}/models/{model}",
        lambda t, a: Req(f"/v1/tokens/{t['token']}/models/{a['model']}"),
        T,
    ),
    Case(
        "unassign A's token from B's model",
        "DELETE",
        "/v1/tokens/{token_id}/models/{model}",
        lambda t, a: Req(f"/v1/tokens/{a['token']}/models/{t['model']}"),
        M,
    ),
    Case(
        "unassign B's token from B's model",
        "DELETE",
        "/v1/tokens/{token_id}/models/{model}",
        lambda t, a: Req(f"/v1/tokens/{t['token']}/models/{t['model']}"),
        T,
    ),
    Case(
        "create token for B's model",
        "POST",
        "/v1/tokens",
        lambda t, a: Req("/v1/tokens", json={"name": "steal", "model": t["model"]}),
        M,
    ),
    Case(
        "create token for A's and B's models",
        "POST",
        "/v1/tokens",
        lambda t, a: Req("/v1/tokens", json={"name": "steal", "models": [a["model"], t["model"]]}),
        M,
    ),
    Case("list tokens of B's model", "GET", "/v1/tokens", lambda t, a: Req("/v1/tokens", params={"model": t["model"]}), M),
    # workers
    Case("list workers of B's model", "GET", "/v1/workers", lambda t, a: Req("/v1/workers", params={"model": t["model"]}), M),
    Case(
        "stats of B's model", "GET", "/v1/workers/stats", lambda t, a: Req("/v1/workers/stats", params={"model": t["model"]}), M
    ),
    Case(
        "query times of B's model",
        "GET",
        "/v1/stats",
        lambda t, a: Req("/v1/stats", params={"model": t["model"], "window_s": "120"}),
        M,
    ),
    Case("show worker", "GET", "/v1/workers/{worker_id}", lambda t, a: Req(f"/v1/workers/{t['worker']}"), W),
    Case("stop worker", "POST", "/v1/workers/{worker_id}/stop", lambda t, a: Req(f"/v1/workers/{t['worker']}/stop"), W),
    Case("standby worker", "POST", "/v1/workers/{worker_id}/standby", lambda t, a: Req(f"/v1/workers/{t['worker']}/standby"), W),
    Case("resume worker", "POST", "/v1/workers/{worker_id}/resume", lambda t, a: Req(f"/v1/workers/{t['worker']}/resume"), W),
    Case("worker logs", "GET", "/v1/workers/{worker_id}/logs", lambda t, a: Req(f"/v1/workers/{t['worker']}/logs"), W),
    Case("start worker for B's model", "POST", "/v1/workers", lambda t, a: Req("/v1/workers", json={"model": t["model"]}), M),
    # worker schedules
    Case("show schedule", "GET", "/v1/schedules/{schedule_id}", lambda t, a: Req(f"/v1/schedules/{t['schedule']}"), S),
    Case(
        "pause schedule", "POST", "/v1/schedules/{schedule_id}/pause", lambda t, a: Req(f"/v1/schedules/{t['schedule']}/pause"), S
    ),
    Case(
        "resume schedule",
        "POST",
        "/v1/schedules/{schedule_id}/resume",
        lambda t, a: Req(f"/v1/schedules/{t['schedule']}/resume"),
        S,
    ),
    Case("remove schedule", "DELETE", "/v1/schedules/{schedule_id}", lambda t, a: Req(f"/v1/schedules/{t['schedule']}"), S),
    Case(
        "schedule B's model",
        "POST",
        "/v1/schedules",
        lambda t, a: Req("/v1/schedules", json={"model": t["model"], "start_cron": "0 8 * * *", "stop_cron": "0 9 * * *"}),
        M,
    ),
    Case(
        "reserve workers of B's model",
        "POST",
        "/v1/schedules",
        lambda t, a: Req(
            "/v1/schedules",
            json={"model": t["model"], "starts_at": "2099-01-01T00:00:00Z", "ends_at": "2099-01-02T00:00:00Z", "workers": 2},
        ),
        M,
    ),
    Case(
        "list schedules of B's model", "GET", "/v1/schedules", lambda t, a: Req("/v1/schedules", params={"model": t["model"]}), M
    ),
    # alerts
    Case(
        "set an alert on B's model",
        "PUT",
        "/v1/alerts",
        lambda t, a: Req("/v1/alerts", json={"model": t["model"], "metric": "average_query_s", "threshold": 0}),
        M,
    ),
    Case(
        "replace B's alert with a webhook",
        "PUT",
        "/v1/alerts",
        lambda t, a: Req(
            "/v1/alerts",
            json={
                "model": t["model"],
                "metric": "average_query_s",
                "threshold": 99,
                "webhook_url": "https://evil.example.com/hook",
                "new_secret": True,
            },
        ),
        M,
    ),
    Case("list alerts of B's model", "GET", "/v1/alerts", lambda t, a: Req("/v1/alerts", params={"model": t["model"]}), M),
    Case(
        "alert events of B's model",
        "GET",
        "/v1/alerts/events",
        lambda t, a: Req("/v1/alerts/events", params={"model": t["model"], "limit": "5"}),
        M,
    ),
    Case("remove B's alert", "DELETE", "/v1/alerts/{alert_id}", lambda t, a: Req(f"/v1/alerts/{t['alert']}"), "alert_not_found"),
    # credits: by model (every other credits route reads the caller's own account only)
    Case(
        "credit history of B's model",
        "GET",
        "/v1/credits/history",
        lambda t, a: Req("/v1/credits/history", params={"model": t["model"]}),
        M,
    ),
    Case(
        "credit history of B's model, a window and kinds",
        "GET",
        "/v1/credits/history",
        lambda t, a: Req("/v1/credits/history", params={"model": t["model"], "since": "2000-01-01", "kind": "runtime"}),
        M,
    ),
    Case(
        "credit usage of B's model",
        "GET",
        "/v1/credits/usage",
        lambda t, a: Req("/v1/credits/usage", params={"model": t["model"]}),
        M,
    ),
    # end user: A's access token against B's model, keys and queries
    Case(
        "client: describe B's model",
        "GET",
        "/v1/client/model",
        lambda t, a: Req("/v1/client/model", params={"model": t["model"]}),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: B's client.zip",
        "GET",
        "/v1/client/model/client.zip",
        lambda t, a: Req("/v1/client/model/client.zip", params={"model": t["model"]}),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: upload a key for B's model",
        "PUT",
        "/v1/client/keys/{key_id}",
        lambda t, a: Req(f"/v1/client/keys/{'ab' * 16}", params={"model": t["model"]}, content=capnp(4)),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: warm a key set on B's model",
        "POST",
        "/v1/client/keys/{key_id}/warmup",
        lambda t, a: Req(f"/v1/client/keys/{A_KEY}/warmup", content=_env(t["model_id"], A_KEY)),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: delete B's key set",
        "DELETE",
        "/v1/client/keys/{key_id}",
        lambda t, a: Req(f"/v1/client/keys/{t['key']}"),
        "evaluation_key_not_found",
        404,
        "a_token",
    ),
    Case(
        "client: warm B's key set",
        "POST",
        "/v1/client/keys/{key_id}/warmup",
        lambda t, a: Req(f"/v1/client/keys/{t['key']}/warmup", content=_env(a["model_id"], t["key"])),
        "evaluation_key_not_found",
        404,
        "a_token",
    ),
    Case(
        "client: query B's model",
        "POST",
        "/v1/queries",
        lambda t, a: Req("/v1/queries", content=_env(t["model_id"], A_KEY)),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: query with B's key",
        "POST",
        "/v1/queries",
        lambda t, a: Req("/v1/queries", params={"wait_for_worker": "true"}, content=_env(a["model_id"], t["key"])),
        "evaluation_key_not_found",
        404,
        "a_token",
    ),
    Case(
        "client: a batch for B's model",
        "POST",
        "/v1/queries/batch",
        lambda t, a: Req("/v1/queries/batch", content=pack_batch([(ITEM, _env(t["model_id"], A_KEY))] * 2)),
        "token_not_for_model",
        403,
        "a_token",
    ),
    Case(
        "client: a batch with B's key",
        "POST",
        "/v1/queries/batch",
        lambda t, a: Req(
            "/v1/queries/batch",
            params={"wait_for_worker": "true"},
            content=pack_batch([(ITEM, _env(a["model_id"], t["key"]))] * 2),
        ),
        "evaluation_key_not_found",
        404,
        "a_token",
    ),
    Case(
        "client: B's query result",
        "GET",
        "/v1/queries/{query_id}",
        lambda t, a: Req(f"/v1/queries/{t['query']}"),
        "query_not_found",
        404,
        "a_token",
    ),
    Case(
        "client: withdraw B's query",
        "DELETE",
        "/v1/queries/{query_id}",
        lambda t, a: Req(f"/v1/queries/{t['query']}"),
        "query_not_found",
        404,
        "a_token",
    ),
]
assert len({c.name for c in CASES}) == len(CASES)

# Routes that take no other account's object, and the test that covers their isolation.
COVERED_ELSEWHERE = {
    ("GET", "/v1/nodes"): "test_the_node_listing_names_no_other_accounts_binding",
    ("GET", "/v1/models"): "test_listings_show_nothing_of_another_account",
    ("GET", "/v1/tokens"): "test_listings_show_nothing_of_another_account",
    ("GET", "/v1/workers"): "test_listings_show_nothing_of_another_account",
    ("GET", "/v1/schedules"): "test_listings_show_nothing_of_another_account",
    ("GET", "/v1/client/models"): "test_listings_show_nothing_of_another_account",
    ("GET", "/v1/client/keys"): "test_listings_show_nothing_of_another_account (the token's own key sets only)",
    ("GET", "/v1/account"): "test_listings_show_nothing_of_another_account (the caller's own account only)",
    ("PATCH", "/v1/account"): "no id: the caller's own account only",
    ("POST", "/v1/account/api-key"): "no id: the caller's own account only",
    ("PUT", "/v1/uploads"): "staged per account: using B's staged uploads is a case above",
    ("GET", "/v1/credits"): "test_credits_show_nothing_of_another_account (the caller's own account only)",
    ("POST", "/v1/credits/purchases"): "test_credits_show_nothing_of_another_account (credits the caller only)",
    ("GET", "/v1/credits/report"): "test_credits_show_nothing_of_another_account (the caller's own account only)",
    ("GET", "/v1/ready"): "no credentials, no account: which platform parts answer, no host names (test_readiness.py)",
}


def _normalise(body: dict[str, str], target: dict[str, str]) -> str:
    """The message with the target's names and ids (and their 12-character prefixes, as an
    upload's message shows) replaced by their kind."""
    message = body["message"]
    for kind, value in sorted(target.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(value, f"<{kind}>")
        if re.fullmatch(r"[0-9a-f]{64}", value):
            message = message.replace(value[:12], f"<{kind}>")
    return message


def _send(world: World, case: Case, target: dict[str, str]) -> Any:
    req = case.build(target, world.a)
    return world.call(case.who, case.method, req.path, json=req.json, params=req.params, content=req.content)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_another_accounts_object_is_not_found(world: World, case: Case):
    a_before, b_before = world.state("a"), world.state("b")  # an earlier case's leak fails that case only
    real = _send(world, case, world.b)
    ghost = _send(world, case, GHOST)
    what = f"{case.method} {case.build(world.b, world.a).path}"

    assert real.status_code == case.status, f"{what} -> {real.status_code} {real.text}"
    body = real.json()
    assert set(body) == {"code", "message"} and body["code"] == case.code, f"{what} -> {body}"
    if case.status == 404:
        assert body["code"] == "not_found" or body["code"].endswith("_not_found"), body
    # Indistinguishable from an object that exists nowhere: A learns nothing of B's.
    assert (ghost.status_code, ghost.json()["code"]) == (real.status_code, body["code"]), f"{what}: {ghost.text}"
    assert _normalise(body, world.b) == _normalise(ghost.json(), GHOST), f"{what}: {body} vs {ghost.json()}"
    assert not set(real.headers) - set(ghost.headers), f"{what}: headers {dict(real.headers)} vs {dict(ghost.headers)}"

    # A refused operation changed nothing, on either side.
    assert world.state("b") == b_before, f"{what} changed B's objects"
    assert world.state("a") == a_before, f"{what} changed A's objects"


def test_every_route_has_an_isolation_case(world: World):
    """Every provider and end-user route of /v1 is covered: a new one needs a case. The routes
    are read from the app's OpenAPI document (FastAPI no longer lists included routers' routes
    flat in ``app.routes``); every route of the gateway is in it."""
    http = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    routes = {
        (method.upper(), path)
        for path, item in world.client.app.openapi()["paths"].items()
        for method in item
        if method in http and path.startswith("/v1/") and path != "/v1/health"
    }
    for prefix in ("/v1/models", "/v1/tokens", "/v1/workers"):
        assert sum(path.startswith(prefix) for _, path in routes) >= 3, f"no routes under {prefix}: {sorted(routes)}"
    covered = {(c.method, c.route) for c in CASES} | set(COVERED_ELSEWHERE)
    assert not routes - covered, f"routes without an isolation case: {sorted(routes - covered)}"
    assert not covered - routes, f"cases for routes that do not exist: {sorted(covered - routes)}"


def _b_marks(world: World) -> list[str]:
    """What must never appear in an answer to A: B's ids, its model names, its node, its credits."""
    b = world.b
    return [
        b["model"],
        b["model_id"],
        b["token"],
        b["worker"],
        b["key"],
        b["query"],
        b["schedule"],
        b["alert"],
        "bob.example.com",
        b["client_upload"][:12],
        b["server_upload"][:12],
        "node-b@test",
        "bob",
        world.b_key[:12],
        world.b_token[:12],
        world.b_purchase["reference"],
        B_PURCHASE,
        "-1.234567",
        B_ORDER,
        *(m["id"] for m in world.b_before["models"]),
        *(v["client_sha256"][:12] for m in world.b_before["models"] for v in world.b_before[f"versions {m['name']}"]),
    ]


def test_listings_show_nothing_of_another_account(world: World):
    a = world.a
    for who, path, params in [
        ("a", "/v1/models", None),
        ("a", "/v1/tokens", None),
        ("a", "/v1/workers", None),
        ("a", "/v1/workers/stats", None),
        ("a", "/v1/account", None),
        ("a", f"/v1/models/{A_MODEL}", None),
        ("a", f"/v1/models/{A_MODEL}/versions", None),
        ("a", f"/v1/models/{A_MODEL}/events", None),
        ("a", f"/v1/models/{TWIN}", None),
        ("a", f"/v1/models/{TWIN}/events", None),
        ("a", "/v1/tokens", {"model": A_MODEL}),
        ("a", "/v1/workers", {"model": A_MODEL}),
        ("a", "/v1/workers/stats", {"model": A_MODEL}),
        ("a", f"/v1/tokens/{a['token']}", None),
        ("a_token", "/v1/client/models", None),
        ("a_token", "/v1/client/model", None),
        ("a_token", "/v1/client/keys", None),
        ("a", "/v1/schedules", None),
        ("a", "/v1/schedules", {"model": A_MODEL}),
        ("a", "/v1/alerts", None),
        ("a", "/v1/alerts", {"model": A_MODEL}),
        ("a", "/v1/alerts/events", None),
        ("a", "/v1/stats", None),
        ("a", "/v1/stats", {"model": A_MODEL}),
        ("a", "/v1/stats", {"model": TWIN}),
    ]:
        answer = world.call(who, "GET", path, params=params)
        assert answer.status_code == 200, f"{path} -> {answer.status_code} {answer.text}"
        leaked = [mark for mark in _b_marks(world) if mark in answer.text]
        assert not leaked, f"{who} GET {path} shows B's {leaked}: {answer.text[:500]}"

    assert {m["name"] for m in world.ok("a", "GET", "/v1/models")} == {A_MODEL, TWIN}
    assert [t["id"] for t in world.ok("a", "GET", "/v1/tokens")] == [a["token"]]
    assert world.ok("a", "GET", "/v1/workers") == []
    assert world.ok("a", "GET", "/v1/schedules") == []
    assert world.ok("a", "GET", "/v1/alerts") == [] and world.ok("a", "GET", "/v1/alerts/events") == []
    assert world.ok("a", "GET", "/v1/workers/stats") == []
    assert [m["name"] for m in world.ok("a_token", "GET", "/v1/client/models")] == [A_MODEL]
    assert [k["key_id"] for k in world.ok("a_token", "GET", "/v1/client/keys")] == [A_KEY]


def test_credits_show_nothing_of_another_account(world: World):
    """A's balance, ledger, usage and reports are A's alone: none of B's lines, figures, models
    or workers, whatever the window or filter; A's purchase credits A only, even under the
    idempotency key B used (a refusal there would tell A that B used it); an end-user token
    sees no credits at all."""
    from sqlmodel import select

    from cipherpool.db import session_scope
    from cipherpool.db.tables import LedgerEntry

    month = f"{datetime.now(UTC):%Y-%m}"
    a_id = world.ok("a", "GET", "/v1/account")["id"]
    b_usage = world.ok("b", "GET", "/v1/credits/usage")  # B's own figures exist, so their absence below means something
    assert [r["worker_id"] for r in b_usage["rows"]] == [world.b["worker"]]
    b_lines = world.ok("b", "GET", "/v1/credits/history")
    assert {B_PURCHASE, "-1.234567"} <= {x["amount"].rstrip("0") for x in b_lines}
    assert Decimal(world.ok("b", "GET", "/v1/credits")["balance"]) == sum(Decimal(x["amount"]) for x in b_lines)

    before = world.state("b")
    bought = world.call("a", "POST", "/v1/credits/purchases", json={"amount": "3", "idempotency_key": B_ORDER})
    assert bought.status_code == 201, bought.text
    assert bought.json()["reference"] != world.b_purchase["reference"]
    assert world.state("b") == before == world.b_before, "A's purchase changed B's credits"

    answers = {
        "balance": world.call("a", "GET", "/v1/credits"),
        "history": world.call("a", "GET", "/v1/credits/history"),
        "history since": world.call("a", "GET", "/v1/credits/history", params={"since": "2000-01-01", "limit": "10000"}),
        "history of kinds": world.call("a", "GET", "/v1/credits/history", params={"kind": ["runtime", "purchase", "grant"]}),
        "history of A's model": world.call("a", "GET", "/v1/credits/history", params={"model": A_MODEL}),
        "history of A's twin": world.call("a", "GET", "/v1/credits/history", params={"model": TWIN}),
        "usage": world.call("a", "GET", "/v1/credits/usage"),
        "usage of A's twin": world.call("a", "GET", "/v1/credits/usage", params={"model": TWIN}),
        "report": world.call("a", "GET", "/v1/credits/report", params={"period": month}),
    }
    for what, answer in answers.items():
        assert answer.status_code == 200, f"{what} -> {answer.status_code} {answer.text}"
        leaked = [mark for mark in _b_marks(world) if mark in answer.text]
        assert not leaked, f"A's credits {what} shows B's {leaked}: {answer.text[:500]}"

    with session_scope(world.db) as session:
        own = session.exec(select(LedgerEntry.public_id, LedgerEntry.amount).where(LedgerEntry.account_id == a_id)).all()
    lines = answers["history"].json()
    assert sorted((x["id"], Decimal(x["amount"])) for x in lines) == sorted((i, Decimal(m) / 10**6) for i, m in own)
    assert [x["kind"] for x in lines] == ["grant", "purchase"]
    assert Decimal(answers["balance"].json()["balance"]) == sum(Decimal(x["amount"]) for x in lines) == 103
    assert answers["balance"].json()["workers_charged"] == 0
    assert answers["history of A's model"].json() == answers["history of A's twin"].json() == []
    assert answers["usage"].json()["rows"] == [] and Decimal(answers["usage"].json()["total_cost"]) == 0
    report = answers["report"].json()
    assert (report["account_id"], report["rows"], report["charges"]) == (a_id, [], {})
    assert Decimal(report["closing_balance"]) == 103 and report["reconciles"] is True

    for path, params in (("/v1/credits", None), ("/v1/credits/history", None), ("/v1/credits/report", {"period": month})):
        refused = world.call("a_token", "GET", path, params=params)  # an end user's token is no API key
        assert (refused.status_code, refused.json()["code"]) == (403, "wrong_credential"), f"{path}: {refused.text}"
    assert world.state("b") == world.b_before


def test_the_node_listing_names_no_other_accounts_binding(world: World):
    """Nodes are the platform's, shared by all accounts: A sees that B's node is busy (a start
    refused for want of a free node tells as much), never B's model, worker or status."""
    answer = world.call("a", "GET", "/v1/nodes")
    assert answer.status_code == 200, answer.text
    leaked = [mark for mark in _b_marks(world) if mark in answer.text and mark != "node-b@test"]
    assert not leaked, f"A's GET /v1/nodes shows B's {leaked}: {answer.text[:500]}"
    b_node = next(n for n in answer.json() if n["name"] == "node-b@test")
    assert (b_node["busy"], b_node["model"], b_node["worker_id"], b_node["worker_status"]) == (True, None, None, None)
    own = next(n for n in world.call("b", "GET", "/v1/nodes").json() if n["name"] == "node-b@test")
    assert (own["model"], own["worker_id"]) == (B_MODEL, world.b["worker"])


def test_a_name_taken_in_another_account_is_the_callers_own(world: World):
    """Both accounts have a model named TWIN (B's made first): A's requests by that name
    reach A's model only; B's is untouched."""
    a_twin = world.ok("a", "GET", f"/v1/models/{TWIN}")
    b_twin = world.b_before[f"model {TWIN}"]
    assert a_twin["id"] != b_twin["id"] and a_twin["description"] == "alice's twin"
    changed = world.ok("a", "PATCH", f"/v1/models/{TWIN}", json={"description": "alice's twin, edited"})
    assert changed["id"] == a_twin["id"]
    assert world.ok("a", "POST", f"/v1/models/{TWIN}/activate")["id"] == a_twin["id"]
    assigned = world.ok("a", "POST", f"/v1/tokens/{world.a['token']}/models", json={"model": TWIN})
    assert sorted(assigned["models"]) == sorted([A_MODEL, TWIN])
    assert world.ok("a", "GET", "/v1/tokens", params={"model": TWIN})[0]["id"] == world.a["token"]
    try:
        assert world.state("b") == world.b_before
    finally:
        world.ok("a", "DELETE", f"/v1/tokens/{world.a['token']}/models/{TWIN}")
        world.ok("a", "POST", f"/v1/models/{TWIN}/deactivate")
        world.ok("a", "PATCH", f"/v1/models/{TWIN}", json={"description": "alice's twin"})


def test_a_key_set_id_used_in_another_account_is_the_callers_own(world: World):
    """A's token registers a key set under B's key id: its own, with nothing of B's refused,
    replaced or revealed."""
    answer = world.call("a_token", "PUT", f"/v1/client/keys/{B_KEY}", content=capnp(6))
    assert answer.status_code == 201, answer.text
    assert world.state("b") == world.b_before


def test_deploying_under_another_accounts_model_name(world: World):
    """A deploys a model named like B's, from the very artifact B's model serves (the same
    content-addressed blobs): no ``model_exists`` (that would reveal B's name), and deleting
    it removes none of B's blobs. Runs last: it gives A a model of B's name for a while."""
    answers = {}
    try:
        for name in (B_MODEL, GHOST["model"]):
            ids = [world.ok("a", "PUT", "/v1/uploads", content=data)["upload_id"] for data in B_V2]
            answers[name] = world.call(
                "a", "POST", "/v1/models", json={"name": name, "client_upload": ids[0], "server_upload": ids[1]}
            )
        for name, answer in answers.items():
            assert answer.status_code == 201, f"deploy {name} -> {answer.status_code} {answer.text}"
            assert answer.json()["id"] != world.b["model_id"]
    finally:
        for name, answer in answers.items():
            if answer.status_code == 201:
                world.ok("a", "DELETE", f"/v1/models/{name}")
    assert world.state("b") == world.b_before
    zipped = world.call("b_token", "GET", "/v1/client/model/client.zip", params={"model": B_MODEL})
    assert zipped.status_code == 200 and zipped.content == B_V2[0]


def test_b_is_unchanged_after_everything(world: World):
    """Through B's own credentials: model, versions, tokens (not revoked, still assigned),
    worker, events and key set exactly as before A began."""
    after = world.state("b")
    assert after == world.b_before
    b = world.b
    model = after[f"model {B_MODEL}"]
    assert (model["status"], model["version"], model["description"], model["max_workers"]) == ("active", 2, "bob's", 2)
    assert [v["number"] for v in after[f"versions {B_MODEL}"]] == [1, 2]
    (token,) = after["tokens"]
    assert token["id"] == b["token"] and token["status"] == "active" and not token["revoked"]
    assert sorted(token["models"]) == sorted([B_MODEL, TWIN])
    (worker,) = after["workers"]
    assert (worker["id"], worker["status"], worker["model"]) == (b["worker"], "up", B_MODEL)
    (schedule,) = after["schedules"]
    assert (schedule["id"], schedule["paused"], schedule["workers"]) == (b["schedule"], False, 2)
    assert after["keys"] and all(k[0] == b["token"] for k in after["keys"])
    assert after["query owner"] == b["token"].encode()
    assert world.ok("b_token", "GET", "/v1/client/model", params={"model": B_MODEL})["id"] == b["model_id"]
