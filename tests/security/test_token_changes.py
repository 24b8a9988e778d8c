"""Access-token rules (issue 7), through the real gateway.

(a) A query with a disabled, revoked, expired, over-quota or unassigned token, or a token of
a disabled account, is refused with an error that names which (HTTP status and ``code``);
undoing the change (enabling, extending, raising the quota, re-assigning, enabling the
account) makes queries accepted again. The quota is counted per accepted query, across
gateways, and a refused query is not counted.

(b) A change takes effect within 5 s on every gateway, not only the one that made it. Two
gateway apps share one Redis and one database, each with its own authenticator cache, whose
TTL is the maximum (5 s): gateway 2's cache is warmed with an accepted request, the change is
made through gateway 1, and gateway 2 must refuse at its very next request (the generation
counter), well before its cache would have expired. A change made in the database alone
(nobody bumps the counter) must be refused within the cache TTL.

No celery worker runs: a query that passes every check is published (202) and nobody takes
it, which is what "accepted" means here. The measured propagation delays are printed
(``pytest -s``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from cipherpool.messages import EncryptedInput
from tests.helpers import value_ciphertext, versions_json, zip_bytes

TTL_S = 5.0  # auth_cache_ttl_s: the maximum the settings allow
PROPAGATION_S = 5.0  # issue 7: a change takes effect within 5 s on every gateway
POLL_S = 0.1
KEY_ID = "c" * 32
ACCEPTED = (200, 202)
CLIENT_ZIP = zip_bytes({"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()})
SERVER_ZIP = zip_bytes({"versions.json": versions_json()})

DELAYS: dict[str, tuple[float, int]] = {}  # what changed -> (seconds until gateway 2 refused, requests it took)


def capnp(words: int) -> bytes:
    """A well-framed Cap'n Proto message of ``words`` 8-byte words (an evaluation key's framing)."""
    return (0).to_bytes(4, "little") + words.to_bytes(4, "little") + b"\x07" * (8 * words)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


# ---- the platform: one Redis, one database, two gateways --------------------------------


@dataclass
class Tenant:
    account_id: str
    name: str
    api_key: str


@dataclass
class Tok:
    id: str
    value: str
    model: str  # the model it was created for
    model_id: str


@dataclass
class World:
    gw1: Any  # TestClient of gateway 1 (where changes are made)
    gw2: Any  # TestClient of gateway 2 (whose cache is warmed, and must refuse)
    settings: Any
    db: str
    artifact: Any

    def tenant(self) -> Tenant:
        from cipherpool.db import session_scope
        from cipherpool.services import accounts

        name = "acct-" + uuid.uuid4().hex[:8]
        with session_scope(self.db) as session:
            account, api_key = accounts.create_account(session, name)
            return Tenant(account.id, name, api_key)

    def model(self, tenant: Tenant, name: str = "digits") -> str:
        """Deploy and activate a model; its id."""
        from cipherpool.db import session_scope
        from cipherpool.db.tables import ModelStatus
        from cipherpool.services import accounts, models

        with session_scope(self.db) as session:
            account = accounts.get_account(session, tenant.account_id)
            model = models.deploy_model(session, account, name, self.artifact)
            models.set_status(session, account, name, ModelStatus.ACTIVE)
            return model.id

    def token(self, tenant: Tenant, model: str, model_id: str, **options: Any) -> Tok:
        """A token assigned to ``model`` (created with the service), whose evaluation key
        ``KEY_ID`` is uploaded through gateway 1."""
        from cipherpool.db import session_scope
        from cipherpool.services import accounts, tokens

        with session_scope(self.db) as session:
            row, value = tokens.create_token(
                session, accounts.get_account(session, tenant.account_id), "t-" + uuid.uuid4().hex[:8], model, **options
            )
            token_id = row.id
        answer = self.gw1.put(f"/v1/client/keys/{KEY_ID}", content=capnp(4), headers=bearer(value))
        assert answer.status_code == 201, answer.text
        return Tok(token_id, value, model, model_id)

    def setup(self, **options: Any) -> tuple[Tenant, Tok]:
        """A fresh account with one active model and one token for it (tests do not share them)."""
        tenant = self.tenant()
        model_id = self.model(tenant)
        return tenant, self.token(tenant, "digits", model_id, **options)

    def as_provider(self, client: Any, tenant: Tenant, method: str, path: str, **kwargs: Any) -> Any:
        answer = client.request(method, path, headers=bearer(tenant.api_key), **kwargs)
        assert answer.status_code < 300, f"{method} {path} -> {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    def show(self, tenant: Tenant, tok: Tok) -> dict[str, Any]:
        return self.as_provider(self.gw1, tenant, "GET", f"/v1/tokens/{tok.id}")


def query(client: Any, tok: Tok, model_id: str | None = None) -> Any:
    """Submit an encrypted query (an EncryptedInput envelope naming the model and the key set)."""
    body = EncryptedInput(model_id or tok.model_id, KEY_ID, value_ciphertext()).encode()
    # No node runs here: the query waits for a worker (else no_worker_up comes before the token's rules).
    return client.post("/v1/queries", params={"wait_for_worker": "true"}, content=body, headers=bearer(tok.value))


def accepted(answer: Any, what: str = "query") -> None:
    assert answer.status_code in ACCEPTED, f"{what}: expected accepted, got {answer.status_code} {answer.text}"


def refused(answer: Any, status: int, code: str, what: str = "query") -> None:
    assert answer.status_code == status, f"{what}: expected {status} {code}, got {answer.status_code} {answer.text}"
    body = answer.json()
    assert set(body) == {"code", "message"} and body["code"] == code, f"{what}: {body}"
    assert body["message"], what


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import init_db
    from cipherpool.fhe.deployment import Versions
    from cipherpool.gateway.app import create_app
    from cipherpool.services import models
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.store import BlobKind, BlobStore

    tmp = tmp_path_factory.mktemp("token-changes")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis")
        # No throttle on failed authentications: these tests are refused on purpose, hundreds of times.
        s = Settings(
            data_dir=tmp / "data",
            broker_url=url,
            token_rate_per_s=0,
            account_rate_per_s=0,
            auth_cache_ttl_s=TTL_S,
            auth_failure_burst=0,
        )
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)
        blobs = store.put(BlobKind.CLIENT_ZIP, CLIENT_ZIP), store.put(BlobKind.SERVER_ZIP, SERVER_ZIP)
        store.redis.close()
        artifact = models.Artifact(blobs[0], blobs[1], len(CLIENT_ZIP), len(SERVER_ZIP), Versions.installed())
        with ExitStack() as stack:
            gw1 = stack.enter_context(TestClient(create_app(s), raise_server_exceptions=False))
            gw2 = stack.enter_context(TestClient(create_app(s), raise_server_exceptions=False))
            assert gw1.app.state.gw.auth is not gw2.app.state.gw.auth  # two caches
            yield World(gw1, gw2, s, db, artifact)
    finally:
        supervisor.stop_all(grace_s=5)


@pytest.fixture(scope="module", autouse=True)
def _report_delays() -> Iterator[None]:
    yield
    if DELAYS:
        print("\n\npropagation to gateway 2 (from the change's acknowledgement to gateway 2's first refusal):")
        for what, (delay, attempts) in DELAYS.items():
            print(f"  {what:<44} {delay * 1000:8.1f} ms  ({attempts} request{'s' * (attempts > 1)})")


# ---- (a) each refusal names why, and undoing the change restores the token -------------------


def test_disabled_token_is_refused_until_enabled(world):
    tenant, tok = world.setup()
    accepted(query(world.gw1, tok))
    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"enabled": False})
    for gw in (world.gw1, world.gw2):
        refused(query(gw, tok), 401, "token_disabled")
    assert world.show(tenant, tok)["status"] == "disabled"

    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"enabled": True})
    for gw in (world.gw1, world.gw2):
        accepted(query(gw, tok), "query after enabling")
    assert world.show(tenant, tok)["status"] == "active"


def test_revoked_token_is_refused_for_good(world):
    tenant, tok = world.setup()
    accepted(query(world.gw1, tok))
    world.as_provider(world.gw1, tenant, "POST", f"/v1/tokens/{tok.id}/revoke")
    for gw in (world.gw1, world.gw2):
        refused(query(gw, tok), 401, "token_revoked")
    shown = world.show(tenant, tok)
    assert shown["status"] == "revoked" and shown["revoked"] is True

    # A revoked token cannot be enabled again: it stays refused.
    answer = world.gw1.patch(f"/v1/tokens/{tok.id}", json={"enabled": True}, headers=bearer(tenant.api_key))
    refused(answer, 422, "invalid_input", "enabling a revoked token")
    refused(query(world.gw1, tok), 401, "token_revoked", "query after trying to enable")


def test_expired_token_is_refused_until_extended(world):
    tenant, tok = world.setup()
    accepted(query(world.gw1, tok))
    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"ttl_s": 0.5})
    time.sleep(0.7)
    for gw in (world.gw1, world.gw2):
        refused(query(gw, tok), 401, "token_expired")
    assert world.show(tenant, tok)["status"] == "expired"

    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"ttl_s": 3600})
    for gw in (world.gw1, world.gw2):
        accepted(query(gw, tok), "query after extending")
    assert world.show(tenant, tok)["status"] == "active"


def test_token_created_expired_is_refused(world):
    """A token whose expiry passes before its first query (no cache involved)."""
    tenant = world.tenant()
    model_id = world.model(tenant)
    tok = world.token(tenant, "digits", model_id, ttl_s=1.0)
    time.sleep(1.2)
    refused(query(world.gw2, tok), 401, "token_expired")
    refused(world.gw1.get("/v1/client/models", headers=bearer(tok.value)), 401, "token_expired", "list models")


def test_quota_counts_accepted_queries_only(world):
    tenant, tok = world.setup(quota=2)
    assert world.show(tenant, tok)["last_used_at"] is None
    accepted(query(world.gw1, tok), "query 1")
    accepted(query(world.gw2, tok), "query 2 (other gateway: one count per token)")
    for gw in (world.gw1, world.gw2, world.gw1):
        refused(query(gw, tok), 429, "token_quota_exceeded", "query past quota")

    shown = world.show(tenant, tok)
    assert shown["queries_used"] == 2, shown  # the refused queries are not counted
    assert shown["status"] == "exhausted" and shown["quota"] == 2, shown
    assert shown["last_used_at"] is not None, shown

    # Raised through gateway 1: gateway 2 (which cached quota=2) accepts again at once.
    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"quota": 3})
    accepted(query(world.gw2, tok), "query after raising the quota")
    refused(query(world.gw1, tok), 429, "token_quota_exceeded", "query past the raised quota")
    shown = world.show(tenant, tok)
    assert (shown["queries_used"], shown["status"]) == (3, "exhausted"), shown

    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"quota": None})
    accepted(query(world.gw2, tok), "query with the quota removed")
    assert world.show(tenant, tok)["status"] == "active"


def test_unassigned_token_is_refused_until_reassigned(world):
    tenant, tok = world.setup()
    other_id = world.model(tenant, "other")
    world.as_provider(world.gw1, tenant, "POST", f"/v1/tokens/{tok.id}/models", json={"model": "other"})
    accepted(query(world.gw1, tok))
    world.as_provider(world.gw1, tenant, "DELETE", f"/v1/tokens/{tok.id}/models/{tok.model}")
    for gw in (world.gw1, world.gw2):
        refused(query(gw, tok), 403, "token_not_for_model")
    # The ciphertext names the model: the token still queries its other model (where its key is
    # not registered, so that one is refused for the key, not for the token).
    refused(query(world.gw1, tok, other_id), 404, "evaluation_key_not_found", "query for the other model")

    world.as_provider(world.gw1, tenant, "POST", f"/v1/tokens/{tok.id}/models", json={"model": tok.model})
    for gw in (world.gw1, world.gw2):
        accepted(query(gw, tok), "query after re-assigning")


def test_token_of_a_disabled_account_is_refused_until_enabled(world):
    from cipherpool.admin import Admin

    tenant, tok = world.setup()
    for gw in (world.gw1, world.gw2):
        accepted(query(gw, tok))
    admin = Admin(world.settings)
    admin.disable_account(tenant.name)
    for gw in (world.gw1, world.gw2):
        refused(query(gw, tok), 403, "account_disabled")
        refused(gw.get("/v1/account", headers=bearer(tenant.api_key)), 403, "account_disabled", "the API key")

    admin.enable_account(tenant.name)
    for gw in (world.gw1, world.gw2):
        accepted(query(gw, tok), "query after enabling the account")


# ---- (b) a change reaches every gateway within 5 s ----------------------------------------


Probe = Callable[[Any], Any]  # one request through a gateway's client


def wait_for_refusal(world: World, probe: Probe, status: int, code: str, limit_s: float) -> tuple[float, int, Any]:
    """Poll gateway 2 every POLL_S until it refuses (status, code); the delay, requests made,
    and the first answer after the change."""
    start = time.monotonic()
    attempts, first = 0, None
    while True:
        answer = probe(world.gw2)
        attempts += 1
        first = first if first is not None else answer
        if answer.status_code == status:
            refused(answer, status, code, "gateway 2 after the change")
            return time.monotonic() - start, attempts, first
        accepted(answer, "gateway 2 before refusing")
        elapsed = time.monotonic() - start
        assert elapsed < limit_s + 1.0, f"gateway 2 still accepts {elapsed:.1f} s after the change ({attempts} requests)"
        time.sleep(POLL_S)


@dataclass(frozen=True)
class Change:
    name: str
    make: Callable[[World, Tenant, Tok], None]  # through gateway 1
    status: int
    code: str
    probe: str = "query"  # "query": a query with the token; "api_key": GET /v1/account with the (old) key

    def __str__(self) -> str:
        return self.name


def _rotate(world: World, tenant: Tenant, tok: Tok) -> None:
    new = world.as_provider(world.gw1, tenant, "POST", "/v1/account/api-key")["api_key"]
    assert new != tenant.api_key
    tenant.api_key = new  # the probe keeps the old one


def _disable_account(world: World, tenant: Tenant, tok: Tok) -> None:
    from cipherpool.admin import Admin

    Admin(world.settings).disable_account(tenant.name)


CHANGES = [
    Change(
        "PATCH /v1/tokens/{id} enabled=false",
        lambda w, t, k: w.as_provider(w.gw1, t, "PATCH", f"/v1/tokens/{k.id}", json={"enabled": False}),
        401,
        "token_disabled",
    ),
    Change(
        "POST /v1/tokens/{id}/revoke",
        lambda w, t, k: w.as_provider(w.gw1, t, "POST", f"/v1/tokens/{k.id}/revoke"),
        401,
        "token_revoked",
    ),
    Change(
        "DELETE /v1/tokens/{id}/models/{name}",
        lambda w, t, k: w.as_provider(w.gw1, t, "DELETE", f"/v1/tokens/{k.id}/models/{k.model}"),
        403,
        "token_not_for_model",
    ),
    Change(
        "POST /v1/models/{name}/deactivate",
        lambda w, t, k: w.as_provider(w.gw1, t, "POST", f"/v1/models/{k.model}/deactivate"),
        409,
        "model_inactive",
    ),
    Change(
        "PATCH /v1/tokens/{id} quota=0",
        lambda w, t, k: w.as_provider(w.gw1, t, "PATCH", f"/v1/tokens/{k.id}", json={"quota": 0}),
        429,
        "token_quota_exceeded",
    ),
    Change(
        "DELETE /v1/tokens/{id}", lambda w, t, k: w.as_provider(w.gw1, t, "DELETE", f"/v1/tokens/{k.id}"), 401, "invalid_token"
    ),
    Change("POST /v1/account/api-key (old key)", _rotate, 401, "invalid_api_key", probe="api_key"),
    Change("Admin.disable_account (token)", _disable_account, 403, "account_disabled"),
    Change("Admin.disable_account (API key)", _disable_account, 403, "account_disabled", probe="api_key"),
]


@pytest.mark.parametrize("change", CHANGES, ids=str)
def test_change_reaches_the_other_gateway_at_once(world, change):
    tenant, tok = world.setup()
    key = tenant.api_key
    if change.probe == "query":

        def probe(gw: Any) -> Any:
            return query(gw, tok)
    else:

        def probe(gw: Any) -> Any:
            return gw.get("/v1/account", headers=bearer(key))

    accepted(probe(world.gw2), "warming gateway 2's cache")
    accepted(probe(world.gw2), "gateway 2 from its cache")
    change.make(world, tenant, tok)
    delay, attempts, _ = wait_for_refusal(world, probe, change.status, change.code, PROPAGATION_S)
    DELAYS[change.name] = (delay, attempts)
    print(f"\n{change.name}: gateway 2 refused after {delay * 1000:.1f} ms ({attempts} requests)")
    assert delay < PROPAGATION_S, f"{change.name}: {delay:.2f} s"
    # Its 5 s cache was warm: refusing at its first request proves the generation counter
    # carried the change, not the cache's expiry.
    assert attempts == 1, f"{change.name}: gateway 2 accepted {attempts - 1} requests after the change"
    if change.probe == "api_key" and change.code == "invalid_api_key":
        accepted(world.gw2.get("/v1/account", headers=bearer(tenant.api_key)), "the new API key on gateway 2")


def test_database_change_reaches_gateways_within_the_cache_ttl(world):
    """Disabled in the database alone (an operator's session, no generation bump): gateway 2
    serves its cached grant until the TTL, then refuses."""
    from cipherpool.db import session_scope
    from cipherpool.services import accounts, tokens

    tenant, tok = world.setup()
    accepted(query(world.gw2, tok), "warming gateway 2's cache")
    with session_scope(world.db) as session:
        tokens.update_token(session, accounts.get_account(session, tenant.account_id), tok.id, {"enabled": False})
    delay, attempts, first = wait_for_refusal(
        world, lambda gw: query(gw, tok), 401, "token_disabled", TTL_S + 2.0
    )  # slack for a loaded machine
    DELAYS["database only: tokens.update_token enabled=False"] = (delay, attempts)
    print(f"\ndatabase-only change: gateway 2 refused after {delay * 1000:.1f} ms ({attempts} requests)")
    assert delay < TTL_S + 2.0, f"{delay:.2f} s"
    # Gateway 1 never cached this token's grant: it refuses at once.
    refused(query(world.gw1, tok), 401, "token_disabled", "gateway 1")
    # Sanity: gateway 2 did serve from its cache (else the tests above would prove nothing).
    assert first.status_code in ACCEPTED, "gateway 2 did not cache the grant"


def test_token_expiring_while_cached_is_refused_at_its_expiry(world):
    tenant, tok = world.setup()
    world.as_provider(world.gw1, tenant, "PATCH", f"/v1/tokens/{tok.id}", json={"ttl_s": 1.0})
    accepted(query(world.gw2, tok), "warming gateway 2's cache before expiry")  # cached for 5 s
    time.sleep(1.2)
    assert world.show(tenant, tok)["status"] == "expired"
    refused(query(world.gw2, tok), 401, "token_expired", "gateway 2 just after expiry")
