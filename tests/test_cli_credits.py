"""`cipherpool credits` and `cipherpool admin credits`, and the ManagementClient's credit
methods, against a real gateway: the app under uvicorn (in a thread, on a free loopback
port) with its own Redis and a SQLite database that the operator's commands open directly.

Charges are written into the ledger as the beat writes them, at fixed times of March 2025,
so that every figure the commands print is known to the micro-credit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli
from cipherpool.cli.credits import CSV_COLUMNS, human_duration
from cipherpool.statuses import LedgerKind


@dataclass
class Gateway:
    url: str
    data_dir: Path
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

    tmp = tmp_path_factory.mktemp("cli-credits")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, redis_url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=64 * 1024**2)
        s = Settings(
            data_dir=tmp / "data", broker_url=redis_url, token_rate_per_s=0, account_rate_per_s=0, management_timeout_s=10
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
            yield Gateway(f"http://127.0.0.1:{port}", tmp / "data", db, s)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            get_engine(db).dispose()
    finally:
        supervisor.stop_all(grace_s=5)


@dataclass
class Provider:
    id: str
    name: str
    key: str
    models: dict[str, str]


def new_account(gw: Gateway, *model_names: str) -> Provider:
    from cipherpool.db import session_scope
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models

    with session_scope(gw.db) as session:
        account, key = accounts.create_account(session, f"cli-credits-{uuid.uuid4().hex[:8]}")
        made = {
            name: models.deploy_model(
                session, account, name, models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11"))
            ).id
            for name in model_names
        }
        return Provider(account.id, account.name, key, made)


def line(gw: Gateway, account_id: str, kind: LedgerKind, micro: int, at: datetime, **fields: Any) -> int:
    from cipherpool.billing import ledger
    from cipherpool.db import session_scope

    with session_scope(gw.db) as session:
        entry = ledger.append(session, account_id, kind, micro, f"test:{uuid.uuid4().hex}", at=at, **fields)
        assert entry is not None and entry.id is not None
        return entry.id


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
def march(gateway: Gateway) -> Provider:
    """An account with a known March 2025: opening 5, in +20 -2, charges 1.625, closing 21.375."""
    p = new_account(gateway, "m1", "m2")
    line(gateway, p.id, LedgerKind.REFUND, 5_000_000, at(2025, 2, 20))
    for kind, worker, start, minutes, per_hour in [
        (LedgerKind.RUNTIME, "w1", at(2025, 3, 3, 0), 60, 1_500_000),
        (LedgerKind.STANDBY, "w1", at(2025, 3, 3, 1), 30, 200_000),
        (LedgerKind.RUNTIME, "w2", at(2025, 3, 31, 23), 60, 1_500_000),
    ]:
        end, ms = start + timedelta(minutes=minutes), minutes * 60_000
        line(
            gateway,
            p.id,
            kind,
            -(per_hour * ms // 3_600_000),
            end,
            model_id=p.models["m1"],
            worker_id=worker,
            node="node-1@test",
            period_start=start,
            period_end=end,
            quantity_ms=ms,
            rate=per_hour,
        )
    minute = at(2025, 3, 4, 10)
    line(
        gateway,
        p.id,
        LedgerKind.EXECUTION,
        -25_000,
        minute + timedelta(minutes=1),
        model_id=p.models["m2"],
        period_start=minute,
        period_end=minute + timedelta(minutes=1),
        quantity_ms=2500,
        queries=7,
        rate=10_000,
    )
    line(gateway, p.id, LedgerKind.GRANT, 20_000_000, at(2025, 3, 10), note="goodwill")
    line(gateway, p.id, LedgerKind.ADJUSTMENT, -2_000_000, at(2025, 3, 15), note="correction")
    return p


def invoke(args: list[Any], expect: int = 0) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != expect and result.exc_info and result.exc_info[0] is not SystemExit:
        import traceback

        traceback.print_exception(*result.exc_info)
    assert result.exit_code == expect, result.output
    return result


def provider(gw: Gateway, p: Provider, *args: Any, expect: int = 0) -> Any:
    """The provider's CLI: the gateway's URL and the account's API key."""
    return invoke(["--url", gw.url, "--api-key", p.key, *args], expect)


def operator(gw: Gateway, *args: Any, expect: int = 0) -> Any:
    """The operator's CLI, where the database is (the gateway's data directory)."""
    return invoke(["--data-dir", gw.data_dir, *args], expect)


def data(result: Any) -> Any:
    return json.loads(result.stdout)


def client(gw: Gateway, p: Provider) -> Any:
    from cipherpool.client import ManagementClient

    return ManagementClient(p.key, gw.url, settings=gw.settings)


# ---- the shape ----------------------------------------------------------------------------


def test_the_credits_group_and_its_commands():
    ctx = click.Context(cli)  # the root's nouns load by name (cipherpool.cli.COMMANDS)
    assert {"balance", "add", "history", "usage", "report"} <= set(cli.get_command(ctx, "credits").commands)
    assert {"grant", "history"} <= set(cli.get_command(ctx, "admin").commands["credits"].commands)
    for args in (["credits"], ["credits", "add"], ["credits", "report"], ["admin", "credits", "grant"]):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "seconds,text",
    [
        (None, "never (nothing is being charged)"),
        (0, "0 s"),
        (59.9, "59 s"),
        (60, "1 min"),
        (3599, "59 min"),
        (3600, "1 h 0 min"),
        (7500, "2 h 5 min"),
        (86_400, "1 d 0 h"),
        (3 * 86_400 + 4 * 3600 + 59, "3 d 4 h"),
    ],
)
def test_durations_read_as_days_hours_minutes(seconds, text):
    assert human_duration(seconds) == text


# ---- balance -------------------------------------------------------------------------------


def test_balance_as_text_and_json(gateway: Gateway):
    p = new_account(gateway)
    text = provider(gateway, p, "credits", "balance").stdout
    for expected in (
        "balance: 100 credits",
        "low: no",
        "burn rate: 0 credits/h",
        "runs out in: never",
        "runs out at: -",
        "workers charged: 0",
    ):
        assert expected in text, text
    for args in (["--json", "credits", "balance"], ["credits", "balance", "--json"]):
        found = data(provider(gateway, p, *args))
        assert (found["balance"], found["low"], found["runs_out_at"]) == ("100.000000", False, None)


def test_balance_shows_when_it_runs_out(gateway: Gateway):
    p = new_account(gateway, "m")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    line(
        gateway,
        p.id,
        LedgerKind.EXECUTION,
        -500_000,
        now - timedelta(minutes=10),
        model_id=p.models["m"],
        period_start=now - timedelta(minutes=11),
        period_end=now - timedelta(minutes=10),
        quantity_ms=50_000,
        queries=10,
        rate=10_000,
    )
    line(gateway, p.id, LedgerKind.ADJUSTMENT, -94_500_000, now - timedelta(minutes=9))
    text = provider(gateway, p, "credits", "balance").stdout
    # 5 credits at 0.5 credits/h: 10 h
    assert "balance: 5 credits" in text and "low: yes (below 10)" in text and "burn rate: 0.5 credits/h" in text
    assert "runs out in: 10 h 0 min" in text, text
    runs_out_at = text.split("runs out at: ")[1].split()[0]
    assert abs((datetime.fromisoformat(runs_out_at) - datetime.now(UTC)) - timedelta(hours=10)) < timedelta(minutes=1)


# ---- add -----------------------------------------------------------------------------------


def test_add_buys_credits_once_per_idempotency_key(gateway: Gateway):
    p = new_account(gateway)
    text = provider(gateway, p, "credits", "add", "25.5", "--note", "PO 7", "--idempotency-key", "po-7").stdout
    assert "settled: yes" in text and "amount: 25.5" in text and "balance: 125.5 credits" in text, text
    reference = text.split("reference: ")[1].split()[0]
    assert reference.startswith("INV-")
    again = data(provider(gateway, p, "credits", "add", "25.5", "--idempotency-key", "po-7", "--json"))
    assert (again["reference"], again["balance"], again["note"]) == (reference, "125.500000", "already credited")
    other = provider(gateway, p, "credits", "add", "30", "--idempotency-key", "po-7", expect=6)
    assert "error [invalid_input]" in other.stderr and "po-7" in other.stderr
    assert data(provider(gateway, p, "--json", "credits", "balance"))["balance"] == "125.500000"


@pytest.mark.parametrize(
    "args,code",
    [
        (["0"], 6),
        (["-5"], 6),
        (["1.0000001"], 6),
        (["abc"], 2),
        (["1e400000"], 6),
        (["1", "--kind", "refund"], 2),
        (["1", "--idempotency-key", "no spaces"], 6),
        (["2000000"], 6),
    ],
)
def test_add_refuses_what_the_gateway_would(gateway: Gateway, args, code):
    p = new_account(gateway)
    provider(gateway, p, "credits", "add", *args, expect=code)
    assert data(provider(gateway, p, "--json", "credits", "balance"))["balance"] == "100.000000"


def test_an_operator_grants_refunds_and_adjusts_with_database_access(gateway: Gateway):
    p = new_account(gateway)
    text = operator(gateway, "credits", "add", "7", "--account", p.name, "--note", "welcome bonus").stdout
    assert "kind: grant" in text and "amount: 7" in text and "balance: 107" in text and "welcome bonus" in text, text
    operator(gateway, "credits", "add", "-2.5", "--account", p.id, "--kind", "adjustment")
    refund = data(operator(gateway, "admin", "credits", "grant", p.name, "3", "--kind", "refund", "--note", "outage", "--json"))
    assert (refund["line"]["kind"], refund["line"]["amount"], refund["line"]["note"], refund["balance"]) == (
        "refund",
        "3.000000",
        "outage",
        "107.500000",
    )
    operator(gateway, "admin", "credits", "grant", p.name, "--kind", "adjustment", "--", "-0.5")
    operator(gateway, "admin", "credits", "grant", p.name, "-0.5", "--kind", "adjustment")
    operator(gateway, "admin", "credits", "grant", p.name, "-1", "--kind", "refund", expect=6)
    operator(gateway, "admin", "credits", "grant", "no-such-account", "1", expect=4)
    # retried with its key: added once; the key for another amount is refused
    for _ in range(2):
        operator(gateway, "admin", "credits", "grant", p.name, "4", "--idempotency-key", "ticket-9")
    refused = operator(gateway, "admin", "credits", "grant", p.name, "40", "--idempotency-key", "ticket-9", expect=6)
    assert "ticket-9" in refused.stderr and "nothing was added" in refused.stderr
    lines = data(operator(gateway, "admin", "credits", "history", p.name, "--json"))
    assert [(x["kind"], x["amount"]) for x in lines] == [
        ("grant", "100.000000"),
        ("grant", "7.000000"),
        ("adjustment", "-2.500000"),
        ("refund", "3.000000"),
        ("adjustment", "-0.500000"),
        ("adjustment", "-0.500000"),
        ("grant", "4.000000"),
    ]
    # the provider sees the same ledger through the gateway
    assert data(provider(gateway, p, "credits", "history", "--json")) == lines
    assert data(provider(gateway, p, "--json", "credits", "balance"))["balance"] == "110.500000"
    table = operator(gateway, "admin", "credits", "history", p.name, "--kind", "refund").stdout
    assert "REFUND" not in table and "refund" in table and "outage" in table and "welcome" not in table
    rows = list(csv.DictReader(io.StringIO(operator(gateway, "admin", "credits", "history", p.id, "--format", "csv").stdout)))
    assert sum(Decimal(r["amount"]) for r in rows) == Decimal("110.5")


def test_a_grant_key_reused_for_another_amount_is_refused(gateway: Gateway):
    from cipherpool.admin import Admin
    from cipherpool.errors import InvalidInput

    p = new_account(gateway)
    admin = Admin(gateway.settings)
    admin.grant_credits(p.id, "4", key="ticket-1")
    with pytest.raises(InvalidInput):
        admin.grant_credits(p.id, "40", key="ticket-1")  # answers the 4-credit line, as if 40 were granted


# ---- history ---------------------------------------------------------------------------------


def test_history_as_table_csv_and_json(gateway: Gateway, march: Provider):
    window = ["--since", "2025-03-01", "--until", "2025-04-01"]
    table = provider(gateway, march, "credits", "history", *window).stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "AT",
        "KIND",
        "AMOUNT",
        "BALANCE_AFTER",
        "MODEL",
        "WORKER_ID",
        "SECONDS",
        "QUERIES",
        "REFERENCE",
        "NOTE",
    ]
    assert [row.split()[2] for row in table[1:]] == ["runtime", "standby", "execution", "grant", "adjustment"]
    assert table[1].split()[3:9] == ["-1.5", "103.5", "m1", "w1", "3600", "-"]

    as_json = data(provider(gateway, march, "credits", "history", *window, "--json"))
    assert data(provider(gateway, march, "--json", "credits", "history", *window)) == as_json
    assert data(provider(gateway, march, "credits", "history", *window, "--format", "json")) == as_json
    assert [x["kind"] for x in as_json] == ["runtime", "standby", "execution", "grant", "adjustment"]

    rows = list(csv.DictReader(io.StringIO(provider(gateway, march, "credits", "history", *window, "--format", "csv").stdout)))
    assert [r["id"] for r in rows] == [str(x["id"]) for x in as_json]
    assert [r["amount"] for r in rows] == [x["amount"] for x in as_json]  # exact, six decimals
    assert (rows[2]["worker_id"], rows[2]["queries"], rows[2]["seconds"]) == ("", "7", "2.5")
    assert sum(Decimal(r["amount"]) for r in rows) == Decimal("16.375")

    everything = data(provider(gateway, march, "credits", "history", "--json"))
    balance = Decimal(data(provider(gateway, march, "--json", "credits", "balance"))["balance"])
    assert sum(Decimal(x["amount"]) for x in everything) == balance == Decimal("119.875")


def test_history_filters(gateway: Gateway, march: Provider):
    def kinds(*args: Any) -> list[str]:
        return [x["kind"] for x in data(provider(gateway, march, "credits", "history", "--json", *args))]

    assert kinds("--kind", "runtime", "--kind", "standby") == ["runtime", "standby", "runtime"]
    assert kinds("--model", "m2") == ["execution"]
    assert kinds("--model", "m1", "--until", "2025-03-31") == ["runtime", "standby"]
    assert kinds("--since", "2025-03-03T02:30:00+02:00", "--until", "2025-03-03T03:30:00+02:00") == ["runtime"]
    assert kinds("--since", "2025-03-03T01:30:00Z", "--until", "2025-03-03T01:30:01Z") == ["standby"]
    assert kinds("--limit", "2") == kinds()[-2:]  # without --since: the latest lines
    assert kinds("--since", "2000-01-01", "--limit", "2") == ["grant", "refund"]  # with it: the first from then on
    assert "No ledger lines." in provider(gateway, march, "credits", "history", "--since", "2030-01-01").stdout
    provider(gateway, march, "credits", "history", "--since", "yesterday", expect=2)
    provider(gateway, march, "credits", "history", "--kind", "bonus", expect=2)
    provider(gateway, march, "credits", "history", "--model", "nope", expect=4)
    disagree = provider(gateway, march, "--json", "credits", "history", "--format", "csv", expect=2)
    assert "disagree" in disagree.output


# ---- usage ---------------------------------------------------------------------------------


def test_usage_as_table_csv_and_json(gateway: Gateway, march: Provider):
    window = ["--since", "2025-03-01", "--until", "2025-04-01"]
    text = provider(gateway, march, "credits", "usage", *window).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["DAY", "MODEL", "WORKER", "KIND", "SECONDS", "QUERIES", "COST"]
    assert [row.split() for row in lines[1:4]] == [
        ["2025-03-03", "m1", "w1", "runtime", "3600", "0", "1.5"],
        ["2025-03-03", "m1", "w1", "standby", "1800", "0", "0.1"],
        ["2025-03-04", "m2", "shared", "execution", "2.5", "7", "0.025"],
    ]
    for expected in (
        "total: 1.625 credits, 5402.5 s, 7 queries",
        "balance: 119.875 credits",
        "burn rate: 0 credits/h",
        "runs out in: never",
    ):
        assert expected in text, text

    used = data(provider(gateway, march, "credits", "usage", *window, "--json"))
    assert used == data(provider(gateway, march, "--json", "credits", "usage", *window))
    assert (used["total_cost"], used["total_queries"], len(used["rows"])) == ("1.625000", 7, 3)

    reader = csv.DictReader(io.StringIO(provider(gateway, march, "credits", "usage", *window, "--format", "csv").stdout))
    rows = list(reader)
    assert reader.fieldnames == CSV_COLUMNS[1:]  # a window, not a period
    usage_rows = [r for r in rows if r["record"] == "usage"]
    assert [(r["day"], r["worker"], r["kind"], r["cost"]) for r in usage_rows] == [
        ("2025-03-03", "w1", "runtime", "1.500000"),
        ("2025-03-03", "w1", "standby", "0.100000"),
        ("2025-03-04", "shared", "execution", "0.025000"),
    ]
    assert sum(Decimal(r["cost"] or 0) for r in rows) == Decimal(used["total_cost"])
    summary = {r["record"]: r["amount"] for r in rows if r["record"] != "usage"}
    assert summary == {"total": "1.625000", "balance": "119.875000", "burn rate per hour": "0.000000", "runs out at": "never"}

    only_m2 = data(provider(gateway, march, "credits", "usage", *window, "--model", "m2", "--json"))
    assert [r["model"] for r in only_m2["rows"]] == ["m2"]
    assert (
        "No usage in this window."
        in provider(gateway, march, "credits", "usage", "--since", "2025-05-01", "--until", "2025-05-02").stdout
    )
    provider(gateway, march, "credits", "usage", "--since", "2025-03-02", "--until", "2025-03-01", expect=6)


# ---- reports -------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_report_as_csv_in_a_private_file(gateway: Gateway, march: Provider, tmp_path: Path):
    out_dir = tmp_path / "reports"
    out_dir.mkdir(mode=0o755)
    os.chmod(out_dir, 0o755)
    target = out_dir / "2025-03.csv"
    target.write_text("old, readable by all")
    os.chmod(target, 0o644)
    result = provider(gateway, march, "credits", "report", "--period", "2025-03", "--output", target)
    assert result.stdout == "" and "reconciles" in result.stderr and str(target) in result.stderr
    assert _mode(target) == 0o600 and _mode(out_dir) == 0o755  # the file is private; the folder is left alone

    report = client(gateway, march).credit_report("2025-03")
    with target.open(newline="") as f:
        rows = list(csv.DictReader(f))
        assert list(rows[0]) == CSV_COLUMNS
    assert {r["period"] for r in rows} == {"2025-03"}
    usage_rows = [r for r in rows if r["record"] == "usage"]
    assert len(usage_rows) == len(report.rows) == 3
    assert sum(Decimal(r["cost"] or 0) for r in rows) == report.total_cost == Decimal("1.625")  # the cost column
    assert [(r["day"], r["model"], r["worker"], r["kind"], r["seconds"], r["queries"]) for r in usage_rows] == [
        ("2025-03-03", "m1", "w1", "runtime", "3600", "0"),
        ("2025-03-03", "m1", "w1", "standby", "1800", "0"),
        ("2025-03-04", "m2", "shared", "execution", "2.5", "7"),
    ]
    summary = [(r["record"], r["day"], r["kind"], r["amount"]) for r in rows if r["record"] != "usage"]
    assert summary == [
        ("total", "", "", "1.625000"),
        ("opening balance", "2025-03-01", "", "5.000000"),
        ("credits in", "", "adjustment", "-2.000000"),
        ("credits in", "", "grant", "20.000000"),
        ("charges", "", "execution", "-0.025000"),
        ("charges", "", "runtime", "-1.500000"),
        ("charges", "", "standby", "-0.100000"),
        ("closing balance", "2025-03-31", "", "21.375000"),
        ("reconciles", "", "", "yes"),
    ]
    # what an accountant checks: opening + credits in + charges == closing
    moved = sum(Decimal(r["amount"]) for r in rows if r["record"] in ("credits in", "charges"))
    figures = {r["record"]: Decimal(r["amount"]) for r in rows if r["record"] in ("opening balance", "closing balance")}
    assert figures["opening balance"] + moved == figures["closing balance"] == report.closing_balance
    # and to stdout, the same text
    printed = provider(gateway, march, "credits", "report", "--period", "2025-03", "--format", "csv").stdout
    assert printed == target.read_text()


def test_a_report_as_json(gateway: Gateway, march: Provider, tmp_path: Path):
    report = client(gateway, march).credit_report("2025-03")
    printed = data(provider(gateway, march, "credits", "report", "--period", "2025-03", "--json"))
    assert printed == report.model_dump(mode="json") and printed["reconciles"] is True
    assert data(provider(gateway, march, "--json", "credits", "report", "--period", "2025-03")) == printed
    target = tmp_path / "march.json"
    provider(gateway, march, "credits", "report", "--period", "2025-03", "--format", "json", "--output", target)
    assert json.loads(target.read_text()) == printed and _mode(target) == 0o600
    for period in ("2025-13", "2025-3", "march"):
        provider(gateway, march, "credits", "report", "--period", period, expect=6)
    provider(gateway, march, "credits", "report", "--period", "2025-03", "--format", "table", expect=2)
    nowhere = provider(
        gateway, march, "credits", "report", "--period", "2025-03", "--output", tmp_path / "no" / "x.csv", expect=1
    )
    assert "x.csv" in nowhere.stderr and "No such file" in nowhere.stderr


# ---- the client ------------------------------------------------------------------------------


def test_the_client_sends_exact_amounts_and_utc_windows(gateway: Gateway, march: Provider):
    from cipherpool.api.schemas import CreditBalance, LedgerLine, PurchaseOut, ReportOut, UsageOut
    from cipherpool.errors import InvalidInput, ModelNotFound

    mc = client(gateway, march)
    try:
        assert isinstance(mc.credits(), CreditBalance)
        for amount in (Decimal("0.1"), "0.2", 1):
            bought = mc.buy_credits(amount, note="exact")
            assert isinstance(bought, PurchaseOut) and bought.line is not None and bought.line.amount == Decimal(amount)
        with pytest.raises(InvalidInput, match="float"):
            mc.buy_credits(0.3)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="not a number"):
            mc.buy_credits("lots")
        assert mc.credits().balance == Decimal("121.175")  # 119.875 + 0.1 + 0.2 + 1, exactly
        again = mc.buy_credits("2", idempotency_key="retry-me")
        assert mc.buy_credits(Decimal("2.000"), idempotency_key="retry-me").line == again.line

        # naive times are UTC
        lines = mc.credit_history(
            since=datetime(2025, 3, 3), until=datetime(2025, 3, 3, 1, 0, 1), kinds=[LedgerKind.RUNTIME, "standby"]
        )
        assert all(isinstance(x, LedgerLine) for x in lines) and [x.kind for x in lines] == [LedgerKind.RUNTIME]
        assert [x.kind for x in mc.credit_history(model="m2")] == [LedgerKind.EXECUTION]
        assert len(mc.credit_history(limit=3)) == 3
        used = mc.credit_usage(since=at(2025, 3, 1), until=at(2025, 4, 1), model="m1")
        assert isinstance(used, UsageOut) and used.total_cost == Decimal("1.6")
        report = mc.credit_report("2025-03")
        assert isinstance(report, ReportOut) and report.reconciles and report.closing_balance == Decimal("21.375")
        with pytest.raises(ModelNotFound):
            mc.credit_usage(model="nope")
    finally:
        mc.close()


def test_another_accounts_key_sees_only_its_own_credits(gateway: Gateway, march: Provider):
    other = new_account(gateway)
    assert data(provider(gateway, other, "--json", "credits", "balance"))["balance"] == "100.000000"
    assert [x["kind"] for x in data(provider(gateway, other, "--json", "credits", "history"))] == ["grant"]
    used = data(provider(gateway, other, "--json", "credits", "usage", "--since", "2025-03-01", "--until", "2025-04-01"))
    assert used["rows"] == [] and used["total_cost"] == "0.000000"
    report = data(provider(gateway, other, "--json", "credits", "report", "--period", "2025-03"))
    assert (report["account_id"], report["rows"], report["credits_in"]) == (other.id, [], {})
    provider(gateway, other, "credits", "history", "--model", "m1", expect=4)  # march's model is not theirs
