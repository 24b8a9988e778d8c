"""Keys with a lifecycle (issue 23), on SQLite and PostgreSQL, over a real Redis: byte quotas,
blobs removed once nothing references them (with the adoption race), idle expiry and last
uses, the typed errors naming the model's version; then through the gateway (under uvicorn):
an end user lists and deletes its key sets, and a QueryClient uploads an expired key set again
by itself."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlmodel import select

from cipherpool import errors
from cipherpool.clock import utcnow
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db.tables import AccessToken, BlobCandidate, EvaluationKey
from cipherpool.fhe.deployment import Versions
from cipherpool.scheduler import keys as key_sweep
from cipherpool.services import accounts, blobs, keysets, keyuse, models, queries, tokens
from cipherpool.services.keysets import KeyQuotas
from cipherpool.store import BlobKind, sha256_hex
from tests.helpers import value_ciphertext

MIB = 1024**2
V = Versions("1.9.0", "2.10.0", "3.11")
EVK = BlobKind.EVALUATION_KEY


def capnp(words: int, fill: int = 7) -> bytes:
    """A well-framed Cap'n Proto message of ``words`` words (an evaluation key's framing)."""
    return (0).to_bytes(4, "little") + words.to_bytes(4, "little") + bytes([fill]) * (8 * words)


def key_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    tmp = tmp_path_factory.mktemp("key-lifecycle-redis")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=256 * MIB)
        yield url
    finally:
        supervisor.stop_all(grace_s=5)


@pytest.fixture
def ctx(db_url, redis_url, tmp_path) -> Iterator[PlatformContext]:
    """The platform as beat's key sweep sees it: this test's database, the module's Redis
    (emptied of the platform's keys), blobs in Redis, no grace period."""
    settings = Settings(
        data_dir=tmp_path / "data",
        broker_url=redis_url,
        database_url=db_url,
        blob_store="redis",
        blob_sweep_grace_s=0,
        key_idle_expiry_s=30 * 86400,
    )
    context = PlatformContext(settings)
    for name in context.store.redis.scan_iter("cipherpool:*"):
        context.store.redis.delete(name)
    yield context
    context.store.redis.close()


@dataclass
class Holder:
    account_id: str
    token_id: str


def provider(ctx: PlatformContext, *, client: str = "c", models_: tuple[str, ...] = ("m",)) -> Holder:
    """An account with active models (client specs ``client`` * 64) and a token assigned to them."""
    with ctx.session() as session:
        account, _ = accounts.create_account(session, f"p-{uuid.uuid4().hex[:6]}")
        for name in models_:
            models.deploy_model(session, account, name, models.Artifact(client * 64, "s" * 64, 100, 200, V))
            models.set_status(session, account, name, models.ModelStatus.ACTIVE)
        token, _ = tokens.create_token(session, account, "t", list(models_), no_expiry=True)
        return Holder(account.id, token.id)


def another_token(ctx: PlatformContext, holder: Holder, name: str = "t2") -> str:
    with ctx.session() as session:
        account = accounts.get_account(session, holder.account_id)
        return tokens.create_token(session, account, name, "m", no_expiry=True)[0].id


def upload(ctx: PlatformContext, token_id: str, kid: str, data: bytes, quotas: KeyQuotas | None = None, model: str = "m") -> str:
    """What the gateway does with an uploaded key: register it (which takes its sweep mark
    away), then write it into the store, then commit."""
    blob = sha256_hex(data)
    with ctx.session() as session:
        grant = queries.grant_for_id(session, token_id)
        queries.register_key(session, grant, queries.pick_model(grant, model), kid, blob, len(data), quotas=quotas)
        ctx.store.put(EVK, data)
    return blob


def marks(ctx: PlatformContext) -> set[str]:
    with ctx.session() as session:
        return {c.blob_id for c in session.exec(select(BlobCandidate))}


def row(ctx: PlatformContext, token_id: str, kid: str) -> EvaluationKey | None:
    with ctx.session() as session:
        return session.exec(select(EvaluationKey).where(EvaluationKey.token_id == token_id, EvaluationKey.key_id == kid)).first()


# ---- blobs leave the store once nothing references them ------------------------------------


def test_replaced_key_sets_leave_one_blob_and_a_deleted_token_none(ctx):
    # Given four different keys of 1 MiB uploaded under one key id (the measurement)
    holder, kid = provider(ctx), key_id()
    uploaded = [upload(ctx, holder.token_id, kid, capnp(MIB // 8, fill)) for fill in range(4)]
    assert all(ctx.store.exists(EVK, b) for b in uploaded)
    # Then the three replaced ones are marked, and beat's sweep removes them: one blob is left
    assert marks(ctx) == set(uploaded[:3])
    report = key_sweep.sweep(ctx)
    assert report.removed == 3 and marks(ctx) == set()
    assert [ctx.store.exists(EVK, b) for b in uploaded] == [False, False, False, True]

    # When the token is deleted, its last blob goes with the next sweep
    with ctx.session() as session:
        tokens.delete_token(session, accounts.get_account(session, holder.account_id), holder.token_id)
    assert key_sweep.sweep(ctx).removed == 1
    assert not ctx.store.exists(EVK, uploaded[3])


def test_a_marked_blob_stays_for_the_grace_period(ctx):
    holder, kid = provider(ctx), key_id()
    old = upload(ctx, holder.token_id, kid, capnp(4, 1))
    upload(ctx, holder.token_id, kid, capnp(4, 2))
    # A sweep within the grace period (a query queued with the old blob may still need it) keeps it
    assert key_sweep.remove_unreferenced(ctx, utcnow() - timedelta(seconds=900), key_sweep.SweepReport()) is None
    assert ctx.store.exists(EVK, old) and marks(ctx) == {old}


def test_a_shared_blob_stays_while_a_key_set_references_it(ctx):
    # Given two tokens whose key sets hold the same bytes (a model without bootstrapping)
    holder = provider(ctx)
    other = another_token(ctx, holder)
    same = capnp(8)
    blob = upload(ctx, holder.token_id, key_id(), same)
    upload(ctx, other, key_id(), same)
    # When one token is deleted and the sweep runs, the blob stays: the other's key set uses it
    with ctx.session() as session:
        tokens.delete_token(session, accounts.get_account(session, holder.account_id), holder.token_id)
    report = key_sweep.sweep(ctx)
    assert (report.removed, report.kept) == (0, 1)
    assert ctx.store.exists(EVK, blob) and marks(ctx) == set()
    # and goes once the last one is deleted by its end user
    with ctx.session() as session:
        keysets.delete_key_set(session, other, keysets.key_ids(session, other)[0])
    assert key_sweep.sweep(ctx).removed == 1 and not ctx.store.exists(EVK, blob)


def test_a_deleted_models_artifacts_and_keys_are_swept(ctx):
    holder = provider(ctx, client="d")
    client_blob = ctx.store.put(BlobKind.CLIENT_ZIP, b"client zip")
    server_blob = ctx.store.put(BlobKind.SERVER_ZIP, b"server zip")
    with ctx.session() as session:
        account = accounts.get_account(session, holder.account_id)
        models.deploy_model(session, account, "zips", models.Artifact(client_blob, server_blob, 10, 10, V))
    evk = upload(ctx, holder.token_id, key_id(), capnp(4))
    with ctx.session() as session:
        account = accounts.get_account(session, holder.account_id)
        models.delete_model(session, account, "zips")
        models.delete_model(session, account, "m")
    assert key_sweep.sweep(ctx).removed == 5  # m's "d" * 64 and "s" * 64 too (never stored: nothing to remove)
    assert not any(
        ctx.store.exists(k, b) for k, b in [(BlobKind.CLIENT_ZIP, client_blob), (BlobKind.SERVER_ZIP, server_blob), (EVK, evk)]
    )


def _in_thread(fn) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_an_upload_adopting_a_blob_while_the_sweep_removes_it_keeps_it(ctx):
    # Given a blob marked long ago that nothing references (its key set was replaced)
    holder, kid = provider(ctx), key_id()
    data = capnp(16, 3)
    blob = upload(ctx, holder.token_id, kid, data)
    upload(ctx, holder.token_id, kid, capnp(16, 4))
    assert marks(ctx) == {blob}
    claimed, commit = threading.Event(), threading.Event()

    def sweep_one() -> bool:
        with ctx.session() as session:
            if not blobs.claim(session, EVK, blob, utcnow()):
                return False
            ctx.store.delete(EVK, blob)
            claimed.set()
            assert commit.wait(30)  # the sweep's transaction stays open: its claim holds the mark
        return True

    # When the sweep has claimed and removed it, and an upload of the same bytes comes meanwhile
    sweeper, swept = _in_thread(sweep_one)
    assert claimed.wait(30)
    uploader, uploaded = _in_thread(lambda: upload(ctx, holder.token_id, key_id(), data))
    time.sleep(0.5)
    # Then the upload waits for the sweep's transaction before it writes the blob
    assert uploader.is_alive() and not ctx.store.exists(EVK, blob)
    commit.set()
    sweeper.join(30)
    uploader.join(30)
    assert swept == [True] and uploaded == [blob]
    # and the blob is there, referenced, and no later sweep removes it
    assert ctx.store.exists(EVK, blob) and marks(ctx) == set()
    key_sweep.sweep(ctx)
    assert ctx.store.exists(EVK, blob)


def test_a_sweep_that_comes_while_an_upload_adopts_the_blob_leaves_it(ctx):
    holder, kid = provider(ctx), key_id()
    data = capnp(16, 5)
    blob = upload(ctx, holder.token_id, kid, data)
    upload(ctx, holder.token_id, kid, capnp(16, 6))
    adopted, commit = threading.Event(), threading.Event()

    def adopt() -> None:
        with ctx.session() as session:
            grant = queries.grant_for_id(session, holder.token_id)
            queries.register_key(session, grant, grant.models[0], key_id(), blob, len(data))
            ctx.store.put(EVK, data)
            adopted.set()
            assert commit.wait(30)

    uploader, _ = _in_thread(adopt)
    assert adopted.wait(30)
    cutoff = utcnow()

    def claim() -> bool:
        with ctx.session() as session:
            return blobs.claim(session, EVK, blob, cutoff)

    sweeper, claimed = _in_thread(claim)
    time.sleep(0.5)
    assert sweeper.is_alive()  # it waits for the upload's transaction
    commit.set()
    uploader.join(30)
    sweeper.join(30)
    assert claimed == [False] and ctx.store.exists(EVK, blob)


# ---- quotas -------------------------------------------------------------------------------


def test_a_key_set_past_the_tokens_quota_is_refused_naming_it(ctx):
    holder, kid = provider(ctx), key_id()
    quotas = KeyQuotas(per_token=100 * 8, per_account=0)
    upload(ctx, holder.token_id, kid, capnp(60), quotas)  # 488 bytes
    upload(ctx, holder.token_id, kid, capnp(90), quotas)  # replacing it: its own old size does not count
    with pytest.raises(errors.TokenKeyQuotaExceeded) as refused:
        upload(ctx, holder.token_id, key_id(), capnp(20), quotas)
    assert "CIPHERPOOL_MAX_KEY_BYTES_PER_TOKEN" in refused.value.message
    assert refused.value.http_status == 409 and refused.value.code == "token_key_quota_exceeded"
    # An expired key set takes nothing of the quota
    with ctx.session() as session:
        keysets.expire_idle(session, 0, utcnow() + timedelta(seconds=1))
    upload(ctx, holder.token_id, key_id(), capnp(90), quotas)


def test_the_accounts_quota_counts_every_token(ctx):
    holder = provider(ctx)
    other = another_token(ctx, holder)
    quotas = KeyQuotas(per_token=0, per_account=2 * 8 * 64)
    upload(ctx, holder.token_id, key_id(), capnp(60), quotas)
    with pytest.raises(errors.AccountKeyQuotaExceeded) as refused:
        upload(ctx, other, key_id(), capnp(70), quotas)
    assert "CIPHERPOOL_MAX_KEY_BYTES_PER_ACCOUNT" in refused.value.message
    assert "488" not in refused.value.message  # the other end users' figure is not told
    # the refused upload left nothing: no row, and its blob is not referenced
    with ctx.session() as session:
        assert keysets.key_ids(session, other) == []
    # and the check before the body (by its declared length) refuses the same
    with ctx.session() as session, pytest.raises(errors.AccountKeyQuotaExceeded):
        queries.check_room(session, queries.grant_for_id(session, other), key_id(), 16, 8 * 71, quotas)


def test_two_uploads_at_once_cannot_pass_a_quota_together(ctx):
    holder = provider(ctx)
    other = another_token(ctx, holder)
    quotas = KeyQuotas(per_token=0, per_account=8 * 100)
    registered, commit = threading.Event(), threading.Event()

    def first() -> None:
        with ctx.session() as session:
            grant = queries.grant_for_id(session, holder.token_id)
            queries.register_key(session, grant, grant.models[0], key_id(), "1" * 64, 8 * 60, quotas=quotas)
            registered.set()
            assert commit.wait(30)  # still uncommitted while the second upload checks the quota

    one, _ = _in_thread(first)
    assert registered.wait(30)
    two, outcome = _in_thread(lambda: upload(ctx, other, key_id(), capnp(59), quotas))
    time.sleep(0.5)
    assert two.is_alive()  # it waits for the first one's transaction
    commit.set()
    one.join(30)
    two.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.AccountKeyQuotaExceeded), outcome


# ---- expiry -------------------------------------------------------------------------------


def test_an_idle_key_set_expires_and_a_query_is_told_which_version_to_upload_for(ctx):
    holder, kid = provider(ctx), key_id()
    blob = upload(ctx, holder.token_id, kid, capnp(4))
    later = utcnow() + timedelta(days=31)
    report = key_sweep.sweep(ctx, now=later)
    assert (report.expired_idle, report.removed) == (1, 1)  # no grace period here: its blob goes in the same run
    assert row(ctx, holder.token_id, kid).expired_at is not None and not ctx.store.exists(EVK, blob)
    # A query with it: expired, naming the model and its serving version
    with ctx.session() as session:
        grant = queries.grant_for_id(session, holder.token_id)
        with pytest.raises(errors.EvaluationKeyExpired) as expired:
            queries.key_blob(session, grant, grant.models[0], kid)
    assert expired.value.http_status == 410 and "serves version 1" in expired.value.message
    assert isinstance(expired.value, errors.EvaluationKeyNotFound)  # a client that handles not-found copes
    # Uploading it again revives it, with a new idle period
    upload(ctx, holder.token_id, kid, capnp(4))
    assert row(ctx, holder.token_id, kid).expired_at is None and ctx.store.exists(EVK, blob)
    with ctx.session() as session:
        assert (
            queries.key_blob(
                session,
                queries.grant_for_id(session, holder.token_id),
                queries.grant_for_id(session, holder.token_id).models[0],
                kid,
            )
            == blob
        )


def test_an_expired_key_set_is_forgotten_one_idle_period_later(ctx):
    holder, kid = provider(ctx), key_id()
    upload(ctx, holder.token_id, kid, capnp(4))
    key_sweep.sweep(ctx, now=utcnow() + timedelta(days=31))
    assert row(ctx, holder.token_id, kid) is not None
    assert key_sweep.sweep(ctx, now=utcnow() + timedelta(days=62)).purged == 1
    assert row(ctx, holder.token_id, kid) is None


def test_last_uses_recorded_in_redis_keep_a_key_set_alive(ctx):
    holder, kid = provider(ctx), key_id()
    upload(ctx, holder.token_id, kid, capnp(4))
    with ctx.session() as session:  # uploaded 40 days ago
        key = session.exec(select(EvaluationKey).where(EvaluationKey.key_id == kid)).one()
        key.last_used_at = key.created_at = utcnow() - timedelta(days=40)
        session.add(key)
    # When a query uses it now (recorded in Redis only, at most once a minute per process)
    keyuse.record(ctx.store.redis, holder.token_id, kid)
    keyuse.record(ctx.store.redis, holder.token_id, kid)
    assert set(keyuse.pending(ctx.store.redis)) == {(holder.token_id, kid)}
    # Then beat's sweep flushes the use into the row, forgets it in Redis, and expires nothing
    report = key_sweep.sweep(ctx)
    assert (report.uses, report.expired_idle) == (1, 0)
    assert keyuse.pending(ctx.store.redis) == {}
    assert utcnow() - keysets_last_use(ctx, holder.token_id, kid) < timedelta(minutes=1)


def keysets_last_use(ctx, token_id, kid):
    from cipherpool.clock import aware

    return aware(row(ctx, token_id, kid).last_used_at)


def test_a_use_never_moves_the_last_use_back(ctx):
    holder, kid = provider(ctx), key_id()
    upload(ctx, holder.token_id, kid, capnp(4))
    before = keysets_last_use(ctx, holder.token_id, kid)
    with ctx.session() as session:
        assert keysets.apply_uses(session, {(holder.token_id, kid): before.timestamp() - 3600}) == 1
    assert keysets_last_use(ctx, holder.token_id, kid) == before


def test_the_key_sets_of_expired_and_revoked_tokens_expire(ctx):
    holder = provider(ctx)
    other = another_token(ctx, holder)
    expired_kid, revoked_kid = key_id(), key_id()
    upload(ctx, holder.token_id, expired_kid, capnp(4, 1))
    upload(ctx, other, revoked_kid, capnp(4, 2))
    with ctx.session() as session:
        token = session.get(AccessToken, holder.token_id)
        token.expires_at = utcnow() - timedelta(seconds=1)
        session.add(token)
        tokens.revoke_token(session, accounts.get_account(session, holder.account_id), other)
    assert key_sweep.sweep(ctx).expired_tokens == 2
    assert row(ctx, holder.token_id, expired_kid).expired_at is not None
    assert row(ctx, other, revoked_kid).expired_at is not None


def test_outdated_keys_name_the_version_they_were_made_for_and_the_serving_one(ctx):
    holder, kid = provider(ctx), key_id()
    upload(ctx, holder.token_id, kid, capnp(4))
    with ctx.session() as session:  # version 2, other client specs; no worker: it serves at once
        models.add_version(
            session, accounts.get_account(session, holder.account_id), "m", models.Artifact("e" * 64, "f" * 64, 1, 1, V)
        )
    with ctx.session() as session:
        grant = queries.grant_for_id(session, holder.token_id)
        with pytest.raises(errors.KeysOutdated) as outdated:
            queries.key_blob(session, grant, grant.models[0], kid)
        listed = keysets.list_key_sets(session, holder.token_id, {}, 86400)
    assert "made for version 1" in outdated.value.message and "serves version 2" in outdated.value.message
    assert [(k.status.value, k.made_for_version, k.serving_version) for k in listed] == [("outdated", 1, 2)]


def test_another_tokens_key_set_is_not_found_as_one_that_does_not_exist(ctx):
    holder, kid = provider(ctx), key_id()
    other = another_token(ctx, holder)
    upload(ctx, holder.token_id, kid, capnp(4))
    with ctx.session() as session:
        with pytest.raises(errors.EvaluationKeyNotFound) as theirs:
            keysets.delete_key_set(session, other, kid)
        with pytest.raises(errors.EvaluationKeyNotFound) as nobodys:
            keysets.delete_key_set(session, other, "0f" * 16)
    assert theirs.value.message.replace(kid, "<id>") == nobodys.value.message.replace("0f" * 16, "<id>")
    assert row(ctx, holder.token_id, kid) is not None


# ---- through the gateway and the clients ------------------------------------------------------


@dataclass
class Gateway:
    url: str
    db: str
    settings: Settings
    ctx: PlatformContext


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url) -> Iterator[Gateway]:
    import uvicorn

    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.supervisor import free_port

    tmp = tmp_path_factory.mktemp("key-lifecycle-gateway")
    s = Settings(
        data_dir=tmp / "data",
        broker_url=redis_url,
        blob_store="redis",
        token_rate_per_s=0,
        account_rate_per_s=0,
        key_warmup=False,
        blob_sweep_grace_s=0,
        max_key_bytes_per_token=4 * MIB,
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
        yield Gateway(f"http://127.0.0.1:{port}", db, s, PlatformContext(s))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        get_engine(db).dispose()


@dataclass
class EndUser:
    token: str
    token_id: str
    model_id: str
    client_blob: str
    http: httpx.Client

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(method, path, headers={"Authorization": f"Bearer {self.token}"}, **kwargs)


@pytest.fixture
def user(gateway: Gateway) -> Iterator[EndUser]:
    client_blob = uuid.uuid4().hex * 2
    with gateway.ctx.session() as session:
        account, _ = accounts.create_account(session, f"p-{uuid.uuid4().hex[:6]}")
        model = models.deploy_model(session, account, "m", models.Artifact(client_blob, "s" * 64, 1, 1, V))
        models.set_status(session, account, "m", models.ModelStatus.ACTIVE)
        token, value = tokens.create_token(session, account, "t", "m")
        ids = token.id, model.id
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield EndUser(value, ids[0], ids[1], client_blob, http)


def test_an_end_user_lists_and_deletes_its_key_sets(gateway: Gateway, user: EndUser):
    kid = key_id()
    for fill in (1, 2):  # uploaded, then replaced under the same id
        assert user.call("PUT", f"/v1/client/keys/{kid}", content=capnp(1000, fill)).status_code == 201
    listed = user.call("GET", "/v1/client/keys").json()
    assert [
        (k["key_id"], k["model"], k["status"], k["size_bytes"], k["made_for_version"], k["serving_version"]) for k in listed
    ] == [(kid, "m", "active", 8008, 1, 1)]
    assert listed[0]["expires_at"] > listed[0]["last_used_at"]

    assert user.call("DELETE", f"/v1/client/keys/{kid}").status_code == 204
    again = user.call("DELETE", f"/v1/client/keys/{kid}")
    assert (again.status_code, again.json()["code"]) == (404, "evaluation_key_not_found")
    assert user.call("GET", "/v1/client/keys").json() == []
    # Both blobs (the replaced one and the deleted one) leave the store with beat's next sweep
    assert key_sweep.sweep(gateway.ctx).removed >= 2
    assert not any(gateway.ctx.store.exists(EVK, sha256_hex(capnp(1000, f))) for f in (1, 2))


def test_an_upload_over_the_tokens_quota_is_refused_before_its_body_is_stored(gateway: Gateway, user: EndUser):
    redis = gateway.ctx.store.redis
    uploads_before = set(redis.scan_iter("cipherpool:upload:*"))
    refused = user.call("PUT", f"/v1/client/keys/{key_id()}", content=capnp(5 * MIB // 8))
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "token_key_quota_exceeded"
    assert "CIPHERPOOL_MAX_KEY_BYTES_PER_TOKEN" in refused.json()["message"]
    assert set(redis.scan_iter("cipherpool:upload:*")) == uploads_before
    # Streamed without a declared length, it is refused once stored, and discarded
    chunks = iter([capnp(5 * MIB // 8)])
    streamed = user.call("PUT", f"/v1/client/keys/{key_id()}", content=chunks)
    assert (streamed.status_code, streamed.json()["code"]) == (409, "token_key_quota_exceeded")
    assert set(redis.scan_iter("cipherpool:upload:*")) == uploads_before
    assert not gateway.ctx.store.exists(EVK, sha256_hex(capnp(5 * MIB // 8)))


def _expire_all(gateway: Gateway, token_id: str) -> None:
    with gateway.ctx.session() as session:
        for key in session.exec(select(EvaluationKey).where(EvaluationKey.token_id == token_id)):
            keysets.expire(session, [key], utcnow())
    from cipherpool.names import AUTH_GENERATION_KEY

    gateway.ctx.store.redis.incr(AUTH_GENERATION_KEY)  # as a change made elsewhere: the gateway's caches go


class StubCrypto:
    """A ClientCrypto without concrete: a fixed key set, its (framed) evaluation key, and
    ciphertexts of the shape ``cipherpool.fhe.values`` accepts."""

    input_shape = None

    def __init__(self) -> None:
        self.id = key_id()

    def key_id(self) -> str:
        return self.id

    def generate_keys(self, force: bool = False) -> str:
        return self.id

    def evaluation_key(self) -> bytes:
        return capnp(64, 9)

    def encrypt(self, x) -> bytes:
        return value_ciphertext()


def query_client(gateway: Gateway, user: EndUser):
    from cipherpool.api.schemas import ClientModelOut
    from cipherpool.client.query import QueryClient

    client = QueryClient(
        user.token,
        gateway.url,
        settings=gateway.settings.model_copy(update={"url": gateway.url}),
        key_dir=Path(gateway.settings.data_dir) / "client-keys" / user.token_id,
    )
    client._model = ClientModelOut(
        id=user.model_id,
        name="m",
        status="active",
        version=1,
        concrete_ml="1.9.0",
        concrete_python="2.10.0",
        client_zip_sha256=user.client_blob,
        running_workers=0,
    )
    client._crypto = StubCrypto()  # type: ignore[assignment]
    return client


def test_a_query_with_an_expired_key_set_makes_the_client_upload_it_again(gateway: Gateway, user: EndUser):
    client = query_client(gateway, user)
    kid = client.upload_evaluation_keys()
    _expire_all(gateway, user.token_id)
    # The gateway's answer: 410, naming the model and its serving version
    refused = user.call("POST", "/v1/queries", params={"wait_for_worker": "true"}, content=client.encrypt([0]))
    assert (refused.status_code, refused.json()["code"]) == (410, "evaluation_key_expired"), refused.text
    assert "'m' serves version 1" in refused.json()["message"]
    # The client's: it uploads the key set again and retries the query once, and says so
    handle = client.submit(client.encrypt([0]), wait_for_worker=True)
    assert handle.id and client.key_actions == [f"key set {kid[:12]}… had expired: uploaded it again and retried the query"]
    assert [k.status.value for k in client.list_keys()] == ["active"]
    client.close()


def test_the_cli_lists_ensures_and_deletes_key_sets(gateway: Gateway, user: EndUser, monkeypatch):
    from cipherpool.cli import cli
    from cipherpool.cli.context import CliContext

    stub = query_client(gateway, user)
    monkeypatch.setattr(CliContext, "query", lambda self, key_dir, model=None: stub)
    run = CliRunner()
    base = ["--url", gateway.url, "--json", "query", "--token", user.token, "keys"]
    ensured = run.invoke(cli, [*base, "ensure"])
    assert ensured.exit_code == 0, ensured.output
    assert "uploaded key set" in ensured.stderr and '"outcome": "uploaded"' in ensured.stdout
    listed = run.invoke(cli, [*base, "list"])
    assert listed.exit_code == 0 and stub.crypto.key_id() in listed.stdout
    deleted = run.invoke(cli, [*base, "delete"])
    assert deleted.exit_code == 0 and stub.crypto.key_id() in deleted.stdout
    assert stub.list_keys() == []
