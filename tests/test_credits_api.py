"""A provider's credits through the real gateway app (in-process ``TestClient``, its own Redis
on a free loopback port, SQLite and PostgreSQL): the sign-up grant, purchases and their
invoices, idempotent retries, refused amounts, the ledger's history and its filters, usage
rows and totals, monthly reports that reconcile, and the balance as the sum of the ledger.

Charges are written as the beat writes them (:func:`cipherpool.billing.ledger.append`, with
the fields :mod:`cipherpool.billing.charging` sets), at fixed times of March 2025, so that
every figure below is known to the micro-credit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from cipherpool.statuses import LedgerKind

MAX_PURCHASE = Decimal("5000")
MARCH = (datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def d(value: Any) -> Decimal:
    return Decimal(str(value))


@dataclass
class Gateway:
    client: Any
    db: str
    redis_url: str
    settings: Any

    def get(self, key: str, path: str, **params: Any) -> Any:
        answer = self.client.get(path, headers=bearer(key), params=params)
        assert answer.status_code == 200, f"GET {path} {params} -> {answer.status_code} {answer.text}"
        return answer.json()

    def post(self, key: str, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(path, headers=bearer(key), json=body)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gw(request, tmp_path_factory) -> Iterator[Gateway]:
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import get_engine, init_db
    from cipherpool.gateway.app import create_app
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from tests.conftest import _postgres_database

    tmp = tmp_path_factory.mktemp(f"credits-{request.param}")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        with _postgres_database() if request.param == "postgresql" else _nothing() as pg:
            s = Settings(
                data_dir=tmp / "data",
                broker_url=url,
                database_url=pg,
                token_rate_per_s=0,
                account_rate_per_s=0,
                credits_max_purchase=MAX_PURCHASE,
            )
            db = s.effective_database_url()
            init_db(db)
            with TestClient(create_app(s), raise_server_exceptions=False) as client:
                yield Gateway(client, db, url, s)
            get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class Provider:
    id: str
    key: str
    models: dict[str, str]  # name -> id


def new_account(gw: Gateway, *models_: str) -> Provider:
    """A fresh account (with its sign-up grant) and models of these names."""
    from cipherpool.db import session_scope
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models

    with session_scope(gw.db) as session:
        account, key = accounts.create_account(session, f"credits-{uuid.uuid4().hex[:8]}")
        made = {}
        for name in models_:
            artifact = models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11"))
            made[name] = models.deploy_model(session, account, name, artifact).id
        return Provider(account.id, key, made)


def line(gw: Gateway, account_id: str, kind: LedgerKind, micro: int, at: datetime, **fields: Any) -> str:
    """One ledger line as the billing code writes it; its id (the opaque one the API shows)."""
    from cipherpool.billing import ledger
    from cipherpool.db import session_scope

    with session_scope(gw.db) as session:
        entry = ledger.append(session, account_id, kind, micro, f"test:{uuid.uuid4().hex}", at=at, **fields)
        assert entry is not None and entry.id is not None
        return entry.public_id


def runtime(
    gw: Gateway,
    p: Provider,
    model: str,
    worker: str,
    start: datetime,
    minutes: int,
    per_hour_micro: int,
    kind: LedgerKind = LedgerKind.RUNTIME,
    at: datetime | None = None,
) -> int:
    """A worker's runtime (or standby) charge for ``minutes`` from ``start``, recorded at its end."""
    end = start + timedelta(minutes=minutes)
    ms = minutes * 60_000
    return line(
        gw,
        p.id,
        kind,
        -(per_hour_micro * ms // 3_600_000),
        at or end,
        model_id=p.models[model],
        worker_id=worker,
        node="node-1@test",
        period_start=start,
        period_end=end,
        quantity_ms=ms,
        rate=per_hour_micro,
    )


def execution(
    gw: Gateway, p: Provider, model: str, minute: datetime, ms: int, queries: int, per_s_micro: int, at: datetime | None = None
) -> int:
    """One minute of shared-node computation, as ``charge_execution`` writes it."""
    return line(
        gw,
        p.id,
        LedgerKind.EXECUTION,
        -(ms * per_s_micro // 1000),
        at or minute + timedelta(minutes=1),
        model_id=p.models[model],
        period_start=minute,
        period_end=minute + timedelta(minutes=1),
        quantity_ms=ms,
        queries=queries,
        rate=per_s_micro,
    )


@dataclass
class March:
    """An account with a known month of March 2025 (and lines either side of it)."""

    p: Provider
    ids: dict[str, str]


@pytest.fixture
def march(gw: Gateway) -> March:
    p = new_account(gw, "m1", "m2")
    at = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    ids = {
        "refund feb": line(gw, p.id, LedgerKind.REFUND, 5_000_000, at(2025, 2, 20, 12)),
        # March: 1.5 credits/h for an hour, 0.2/h for half an hour on standby, 2.5 s shared at 0.01/s
        "runtime": runtime(gw, p, "m1", "w1", at(2025, 3, 3, 0), 60, 1_500_000),
        "standby": runtime(gw, p, "m1", "w1", at(2025, 3, 3, 1), 30, 200_000, kind=LedgerKind.STANDBY),
        "execution": execution(gw, p, "m2", at(2025, 3, 4, 10), 2500, 7, 10_000),
        "grant": line(gw, p.id, LedgerKind.GRANT, 20_000_000, at(2025, 3, 10), note="goodwill"),
        "adjustment": line(gw, p.id, LedgerKind.ADJUSTMENT, -2_000_000, at(2025, 3, 15), note="correction"),
        # the first instant of April: not March's
        "april": runtime(gw, p, "m1", "w2", at(2025, 3, 31, 23), 60, 1_500_000),
    }
    return March(p, ids)


def history(gw: Gateway, key: str, **params: Any) -> list[dict[str, Any]]:
    return gw.get(key, "/v1/credits/history", **params)


def invoices(gw: Gateway, account_id: str) -> list[Any]:
    from sqlmodel import select

    from cipherpool.db import session_scope
    from cipherpool.db.tables import Invoice

    with session_scope(gw.db) as session:
        rows = session.exec(select(Invoice).where(Invoice.account_id == account_id)).all()
        return [(r.id, r.amount, r.status, r.provider, r.note) for r in rows]


def assert_typed_error(answer: Any, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    return body


# ---- balance and sign-up -------------------------------------------------------------------


def test_a_new_account_starts_with_its_signup_grant(gw: Gateway):
    p = new_account(gw)
    raw = gw.get(p.key, "/v1/credits")
    assert raw["balance"] == "100.000000" and isinstance(raw["low_balance_threshold"], str)  # exact, as strings
    assert (raw["low"], d(raw["burn_rate_per_hour"]), raw["runs_out_in_s"], raw["runs_out_at"], raw["workers_charged"]) == (
        False,
        0,
        None,
        None,
        0,
    )
    assert (raw["unit"], raw["smallest_unit"]) == ("credit", "micro-credit")
    (grant,) = history(gw, p.key)
    assert (grant["kind"], d(grant["amount"]), d(grant["balance_after"]), grant["note"]) == ("grant", 100, 100, "sign-up grant")


def test_the_burn_rate_counts_the_last_hours_shared_execution(gw: Gateway):
    p = new_account(gw, "m")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    execution(gw, p, "m", now - timedelta(minutes=20), 50_000, 10, 10_000, at=now - timedelta(minutes=19))  # 0.5
    execution(gw, p, "m", now - timedelta(hours=3), 50_000, 10, 10_000, at=now - timedelta(hours=3))  # too old
    raw = gw.get(p.key, "/v1/credits")
    assert d(raw["balance"]) == 99 and d(raw["burn_rate_per_hour"]) == Decimal("0.5")
    assert raw["runs_out_in_s"] == pytest.approx(99 / 0.5 * 3600)
    left = datetime.fromisoformat(raw["runs_out_at"]) - datetime.now(UTC)
    assert abs(left.total_seconds() - 99 / 0.5 * 3600) < 60


def test_a_balance_below_the_threshold_is_low(gw: Gateway):
    p = new_account(gw)
    line(gw, p.id, LedgerKind.ADJUSTMENT, -95_000_000, datetime.now(UTC))
    raw = gw.get(p.key, "/v1/credits")
    assert (d(raw["balance"]), raw["low"], d(raw["low_balance_threshold"])) == (5, True, 10)


# ---- purchases ---------------------------------------------------------------------------


def test_a_purchase_credits_the_account_and_records_an_open_invoice(gw: Gateway):
    p = new_account(gw)
    answer = gw.post(p.key, "/v1/credits/purchases", {"amount": "50.25", "note": "PO 1234"})
    assert answer.status_code == 201, answer.text
    bought = answer.json()
    assert bought["settled"] is True and bought["reference"].startswith("INV-")
    assert bought["reference"] in bought["note"] or "offline" in bought["note"]
    assert (bought["balance"], bought["line"]["amount"], bought["line"]["kind"]) == ("150.250000", "50.250000", "purchase")
    assert (bought["line"]["reference"], bought["line"]["note"], d(bought["line"]["balance_after"])) == (
        bought["reference"],
        "PO 1234",
        Decimal("150.25"),
    )
    assert invoices(gw, p.id) == [(bought["reference"], 50_250_000, "open", "offline-invoice", "PO 1234")]
    assert d(gw.get(p.key, "/v1/credits")["balance"]) == Decimal("150.25")
    assert [x["id"] for x in history(gw, p.key, kind="purchase")] == [bought["line"]["id"]]


def test_a_purchase_without_a_note_says_what_it_is(gw: Gateway):
    p = new_account(gw)
    bought = gw.post(p.key, "/v1/credits/purchases", {"amount": "1"}).json()
    assert "purchase of 1 credits" in bought["line"]["note"] and bought["reference"] in bought["line"]["note"]


def test_a_retried_purchase_credits_nothing_twice(gw: Gateway):
    p = new_account(gw)
    body = {"amount": "10", "idempotency_key": "order-42", "note": "first try"}
    first = gw.post(p.key, "/v1/credits/purchases", body)
    again = gw.post(p.key, "/v1/credits/purchases", {**body, "note": "the retry"})
    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.json()["line"] == first.json()["line"] and again.json()["reference"] == first.json()["reference"]
    assert again.json()["settled"] is True and d(again.json()["balance"]) == 110
    assert d(gw.get(p.key, "/v1/credits")["balance"]) == 110
    assert len(history(gw, p.key, kind="purchase")) == 1 and len(invoices(gw, p.id)) == 1


def test_the_same_key_for_another_amount_is_refused(gw: Gateway):
    p = new_account(gw)
    assert gw.post(p.key, "/v1/credits/purchases", {"amount": "10", "idempotency_key": "k-1"}).status_code == 201
    body = assert_typed_error(
        gw.post(p.key, "/v1/credits/purchases", {"amount": "11", "idempotency_key": "k-1"}), 422, "invalid_input"
    )
    assert "k-1" in body["message"] and "10" in body["message"]
    assert d(gw.get(p.key, "/v1/credits")["balance"]) == 110 and len(invoices(gw, p.id)) == 1


def test_an_idempotency_key_is_the_accounts_own(gw: Gateway):
    """Another account's purchase under the same key is its own purchase, not a retry of this one."""
    p, q = new_account(gw), new_account(gw)
    mine = gw.post(p.key, "/v1/credits/purchases", {"amount": "10", "idempotency_key": "shared-key"}).json()
    theirs = gw.post(q.key, "/v1/credits/purchases", {"amount": "7", "idempotency_key": "shared-key"})
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["line"]["id"] != mine["line"]["id"] and d(theirs.json()["balance"]) == 107
    assert d(gw.get(p.key, "/v1/credits")["balance"]) == 110


@pytest.mark.parametrize(
    "amount",
    ["0", "-5", "0.0000001", "1.1234567", "abc", "NaN", "Infinity", "", str(MAX_PURCHASE + Decimal("0.000001")), "1e9", None],
)
def test_refused_amounts_credit_nothing(gw: Gateway, amount):
    p = new_account(gw)
    body = {} if amount is None else {"amount": amount}
    assert_typed_error(gw.post(p.key, "/v1/credits/purchases", body), 422, "invalid_input")
    assert d(gw.get(p.key, "/v1/credits")["balance"]) == 100 and invoices(gw, p.id) == []


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "1", "idempotency_key": "has space"},
        {"amount": "1", "idempotency_key": "x" * 65},
        {"amount": "1", "note": "n" * 201},
        {"amount": "1", "account_id": "someone-else"},
    ],
)
def test_refused_purchase_fields(gw: Gateway, body):
    p = new_account(gw)
    assert_typed_error(gw.post(p.key, "/v1/credits/purchases", body), 422, "invalid_input")
    assert invoices(gw, p.id) == []


def test_the_largest_purchase_and_the_smallest_unit_are_accepted(gw: Gateway):
    p = new_account(gw)
    for amount in (str(MAX_PURCHASE), "0.000001"):
        assert gw.post(p.key, "/v1/credits/purchases", {"amount": amount}).status_code == 201
    assert gw.get(p.key, "/v1/credits")["balance"] == f"{100 + MAX_PURCHASE}.000001"


class PendingPayments:
    """A card-like payment provider: the payment is taken, and clears later (not yet)."""

    name = "pending-card"
    taken: list[tuple[str, int]] = []

    def purchase(self, session: Any, account_id: str, amount_micro: int, note: str) -> Any:
        from cipherpool.billing.payments import Payment

        self.taken.append((account_id, amount_micro))
        return Payment(f"PAY-{len(self.taken)}", settled=False, note="card payment pending")


@pytest.fixture
def pending_gateway(gw: Gateway) -> Iterator[Gateway]:
    from fastapi.testclient import TestClient

    from cipherpool.gateway.app import create_app

    settings = gw.settings.model_copy(update={"payment_provider": f"{__name__}:PendingPayments"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Gateway(client, gw.db, gw.redis_url, settings)


def test_an_unsettled_purchase_credits_nothing_yet(pending_gateway: Gateway):
    p = new_account(pending_gateway)
    answer = pending_gateway.post(p.key, "/v1/credits/purchases", {"amount": "10", "idempotency_key": "card-1"})
    assert answer.status_code == 201, answer.text
    bought = answer.json()
    assert (bought["settled"], bought["line"], d(bought["balance"]), bought["reference"]) == (
        False,
        None,
        100,
        bought["reference"],
    )
    assert bought["reference"].startswith("PAY-") and bought["note"] == "card payment pending"
    assert len(history(pending_gateway, p.key)) == 1  # the sign-up grant only


def test_a_retried_unsettled_purchase_takes_one_payment(pending_gateway: Gateway):
    p = new_account(pending_gateway)
    for _ in range(2):  # the client timed out and retries, as the idempotency key is there for
        answer = pending_gateway.post(p.key, "/v1/credits/purchases", {"amount": "10", "idempotency_key": "card-2"})
        assert answer.status_code == 201, answer.text
    assert [taken for taken in PendingPayments.taken if taken[0] == p.id] == [(p.id, 10_000_000)]


# ---- history ------------------------------------------------------------------------------


def test_history_filters_by_time_kind_and_model(gw: Gateway, march: March):
    key, ids = march.p.key, march.ids
    in_march = [ids[k] for k in ("runtime", "standby", "execution", "grant", "adjustment")]
    assert [x["id"] for x in history(gw, key, since="2025-03-01", until="2025-04-01")] == in_march
    assert [x["id"] for x in history(gw, key, since="2025-03-01T00:00:00Z", until="2025-04-01T00:00:00Z")] == in_march
    # since is inclusive, until exclusive: the April line is at 2025-04-01T00:00 exactly
    assert [x["id"] for x in history(gw, key, since="2025-04-01T00:00:00+00:00", until="2025-04-02")] == [ids["april"]]
    assert [x["id"] for x in history(gw, key, since="2025-03-03T01:00:00Z", until="2025-03-03T01:00:01Z")] == [ids["runtime"]]
    assert [x["id"] for x in history(gw, key, kind=["runtime", "standby"])] == [ids["runtime"], ids["standby"], ids["april"]]
    assert [x["id"] for x in history(gw, key, kind="grant")][1:] == [ids["grant"]]  # after the sign-up grant
    assert [x["id"] for x in history(gw, key, model="m2")] == [ids["execution"]]
    assert [x["id"] for x in history(gw, key, model="m1", since="2025-03-01", until="2025-04-01", kind="standby")] == [
        ids["standby"]
    ]
    # Without since: the latest lines (oldest first); with since: the first from then on.
    everything = [x["id"] for x in history(gw, key)]
    assert [x["id"] for x in history(gw, key, limit=2)] == everything[-2:]
    assert [x["id"] for x in history(gw, key, since="2000-01-01", limit=2)] == [everything[0], ids["refund feb"]]
    assert history(gw, key, since="2030-01-01") == []


def test_history_with_an_offset_is_the_same_instant(gw: Gateway, march: March):
    plus2 = timezone(timedelta(hours=2))
    since = datetime(2025, 3, 3, 2, 30, tzinfo=plus2).isoformat()  # 00:30 UTC
    until = datetime(2025, 3, 3, 3, 30, tzinfo=plus2).isoformat()  # 01:30 UTC: only the runtime line (01:00)
    assert [x["id"] for x in history(gw, march.p.key, since=since, until=until)] == [march.ids["runtime"]]


def test_history_lines_carry_what_was_charged(gw: Gateway, march: March):
    lines = {x["id"]: x for x in history(gw, march.p.key)}
    run = lines[march.ids["runtime"]]
    assert (run["kind"], d(run["amount"]), run["model"], run["model_id"], run["worker_id"], run["node"]) == (
        "runtime",
        Decimal("-1.5"),
        "m1",
        march.p.models["m1"],
        "w1",
        "node-1@test",
    )
    assert (d(run["seconds"]), d(run["rate"]), run["queries"]) == (3600, Decimal("1.5"), None)
    assert datetime.fromisoformat(run["period_start"]) == datetime(2025, 3, 3, tzinfo=UTC)
    assert datetime.fromisoformat(run["at"]) == datetime(2025, 3, 3, 1, tzinfo=UTC)
    ex = lines[march.ids["execution"]]
    assert (d(ex["amount"]), d(ex["seconds"]), ex["queries"], ex["worker_id"], d(ex["rate"])) == (
        Decimal("-0.025"),
        Decimal("2.5"),
        7,
        None,
        Decimal("0.01"),
    )


@pytest.mark.parametrize(
    "params", [{"kind": "bonus"}, {"limit": "0"}, {"limit": "10001"}, {"since": "yesterday"}, {"model": "no such"}]
)
def test_bad_history_filters_are_refused(gw: Gateway, params):
    p = new_account(gw)
    assert_typed_error(gw.client.get("/v1/credits/history", headers=bearer(p.key), params=params), 422, "invalid_input")


def test_history_of_an_unknown_model_is_not_found(gw: Gateway):
    p = new_account(gw)
    assert_typed_error(
        gw.client.get("/v1/credits/history", headers=bearer(p.key), params={"model": "nope"}), 404, "model_not_found"
    )


def test_the_balance_is_the_sum_of_the_history(gw: Gateway, march: March):
    key = march.p.key
    gw.post(key, "/v1/credits/purchases", {"amount": "3.333333"})
    lines = history(gw, key)
    balance = d(gw.get(key, "/v1/credits")["balance"])
    assert balance == sum(d(x["amount"]) for x in lines) == d(lines[-1]["balance_after"])
    running = Decimal(0)
    for x in lines:  # each line's balance_after is the sum so far (in the order they were written)
        running += d(x["amount"])
        assert d(x["balance_after"]) == running, x
    # 100 + 5 refund - 1.5 - 0.1 - 0.025 + 20 - 2 - 1.5 (April) + 3.333333
    assert balance == Decimal("123.208333")


# ---- usage --------------------------------------------------------------------------------


def test_usage_rows_and_totals(gw: Gateway, march: March):
    import redis

    from cipherpool.billing.querycounts import day_key

    p = march.p
    with redis.Redis.from_url(gw.redis_url) as r:  # the dedicated worker's queries, as the node counts them
        r.hincrby(day_key(p.id, date(2025, 3, 3)), f"{p.models['m1']}:w1", 12)
        r.hincrby(day_key(p.id, date(2025, 3, 4)), f"{p.models['m2']}:shared", 99)  # on the execution lines already
    used = gw.get(p.key, "/v1/credits/usage", since="2025-03-01", until="2025-04-01")
    rows = [(r["day"], r["model"], r["worker_id"], r["kind"], d(r["seconds"]), r["queries"], d(r["cost"])) for r in used["rows"]]
    assert rows == [
        ("2025-03-03", "m1", "w1", "runtime", Decimal(3600), 12, Decimal("1.5")),
        ("2025-03-03", "m1", "w1", "standby", Decimal(1800), 0, Decimal("0.1")),
        ("2025-03-04", "m2", None, "execution", Decimal("2.5"), 7, Decimal("0.025")),
    ]
    assert (d(used["total_cost"]), d(used["total_seconds"]), used["total_queries"]) == (Decimal("1.625"), Decimal("5402.5"), 19)
    assert d(used["total_cost"]) == sum(d(r["cost"]) for r in used["rows"])
    assert d(used["balance"]) == d(gw.get(p.key, "/v1/credits")["balance"])
    assert (d(used["burn_rate_per_hour"]), used["runs_out_in_s"], used["runs_out_at"]) == (0, None, None)
    assert datetime.fromisoformat(used["since"]) == MARCH[0] and datetime.fromisoformat(used["until"]) == MARCH[1]

    only_m2 = gw.get(p.key, "/v1/credits/usage", since="2025-03-01", until="2025-04-01", model="m2")
    assert [(r["model"], r["kind"]) for r in only_m2["rows"]] == [("m2", "execution")]
    assert d(only_m2["total_cost"]) == Decimal("0.025")


def test_usage_days_come_from_the_period_charged(gw: Gateway, march: March):
    """The April line ran on 31 March: in a window holding its record time, its row is 31 March's."""
    used = gw.get(march.p.key, "/v1/credits/usage", since="2025-03-31", until="2025-04-02")
    assert [(r["day"], r["worker_id"], d(r["cost"])) for r in used["rows"]] == [("2025-03-31", "w2", Decimal("1.5"))]


def test_usage_defaults_to_the_last_30_days(gw: Gateway, march: March):
    used = gw.get(march.p.key, "/v1/credits/usage")
    window = datetime.fromisoformat(used["until"]) - datetime.fromisoformat(used["since"])
    assert window == timedelta(days=30) and used["rows"] == [] and d(used["total_cost"]) == 0


@pytest.mark.parametrize(
    "params",
    [{"since": "2025-03-02", "until": "2025-03-01"}, {"since": "2020-01-01", "until": "2025-01-01"}, {"until": "not a time"}],
)
def test_bad_usage_windows_are_refused(gw: Gateway, params):
    p = new_account(gw)
    assert_typed_error(gw.client.get("/v1/credits/usage", headers=bearer(p.key), params=params), 422, "invalid_input")


# ---- reports ------------------------------------------------------------------------------


def test_a_months_report_reconciles_to_the_ledger(gw: Gateway, march: March):
    key = march.p.key
    report = gw.get(key, "/v1/credits/report", period="2025-03")
    assert (report["period"], report["account_id"], report["reconciles"]) == ("2025-03", march.p.id, True)
    assert datetime.fromisoformat(report["since"]) == MARCH[0] and datetime.fromisoformat(report["until"]) == MARCH[1]
    assert d(report["opening_balance"]) == 5  # the February refund (the sign-up grant is of today)
    assert {k: d(v) for k, v in report["credits_in"].items()} == {"grant": 20, "adjustment": -2}
    assert {k: d(v) for k, v in report["charges"].items()} == {
        "runtime": Decimal("1.5"),
        "standby": Decimal("0.1"),
        "execution": Decimal("0.025"),
    }
    assert d(report["closing_balance"]) == Decimal("21.375")
    assert d(report["total_cost"]) == sum(d(r["cost"]) for r in report["rows"]) == sum(map(d, report["charges"].values()))
    # against the history, line by line
    before = sum(d(x["amount"]) for x in history(gw, key, until="2025-03-01"))
    during = sum(d(x["amount"]) for x in history(gw, key, since="2025-03-01", until="2025-04-01"))
    assert d(report["opening_balance"]) == before
    assert (
        d(report["closing_balance"])
        == before + during
        == d(report["opening_balance"]) + sum(map(d, report["credits_in"].values())) - sum(map(d, report["charges"].values()))
    )


def test_the_next_months_report_opens_where_the_last_closed(gw: Gateway, march: March):
    april = gw.get(march.p.key, "/v1/credits/report", period="2025-04")
    assert d(april["opening_balance"]) == Decimal("21.375") and april["reconciles"] is True
    assert {k: d(v) for k, v in april["charges"].items()} == {"runtime": Decimal("1.5")}
    assert d(april["closing_balance"]) == Decimal("19.875")
    now = datetime.now(UTC)
    this_month = gw.get(march.p.key, "/v1/credits/report", period=f"{now:%Y-%m}")
    assert this_month["credits_in"] == {"grant": "100.000000"} and this_month["reconciles"] is True
    assert d(this_month["closing_balance"]) == d(gw.get(march.p.key, "/v1/credits")["balance"])


def test_an_empty_month_reconciles(gw: Gateway):
    p = new_account(gw)
    report = gw.get(p.key, "/v1/credits/report", period="1999-12")
    assert (report["rows"], report["credits_in"], report["charges"], report["reconciles"]) == ([], {}, {}, True)
    assert d(report["opening_balance"]) == d(report["closing_balance"]) == 0


@pytest.mark.parametrize("period", ["2025-13", "2025-00", "2025-3", "2025-03-01", "march", "0000-01", "9999-12", "", None])
def test_a_bad_period_is_refused(gw: Gateway, period):
    p = new_account(gw)
    params = {} if period is None else {"period": period}
    assert_typed_error(gw.client.get("/v1/credits/report", headers=bearer(p.key), params=params), 422, "invalid_input")


# ---- credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/credits"),
        ("POST", "/v1/credits/purchases"),
        ("GET", "/v1/credits/history"),
        ("GET", "/v1/credits/usage"),
        ("GET", "/v1/credits/report?period=2025-03"),
    ],
)
def test_credits_need_an_api_key(gw: Gateway, method, path):
    body = {"amount": "1"} if method == "POST" else None
    for headers in ({}, bearer("cpk_" + "0" * 40)):
        answer = gw.client.request(method, path, headers=headers, json=body)
        assert answer.status_code == 401, answer.text
