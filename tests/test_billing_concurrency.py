"""Billing ticks against each other and against a crash, in real processes, on SQLite and PostgreSQL.

Each test has a database of its own (a SQLite file, or a fresh PostgreSQL database). Ticks run
in child processes (``sys.executable -c``) that import everything, say they are ready, then
wait for a common "go" so that they really overlap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlmodel import col, select

from cipherpool.billing import ledger, rates
from cipherpool.billing.charging import BUCKET_S, bucket_of, charge_all, epoch_ms, epoch_us, record_execution
from cipherpool.billing.money import MS_PER_HOUR
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.db.tables import Account, LedgerEntry, Model, ModelStatus, PoolNode, Worker, WorkerStatus
from cipherpool.names import SHARED_PENDING_KEY
from cipherpool.services import accounts
from tests.conftest import REDIS_TEST_DB

T0 = datetime(2030, 3, 14, 9, 26, 53, 589_793, tzinfo=UTC)
EARLY = datetime(2000, 1, 1, tzinfo=UTC)
RUNTIME = 1_000_000  # cpu, micro-credits per hour (the settings' default)
GRANT = 100_000_000
REDIS_DB = REDIS_TEST_DB  # 13, or one per xdist worker (tests/conftest.py)

CHILD = r"""
import json, os, signal, sys, time
from datetime import datetime
from pathlib import Path

url, data_dir, now_iso, sync_dir, name, mode = sys.argv[1:7]
from cipherpool.billing.charging import charge_all
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope

settings = Settings(database_url=url, data_dir=data_dir)
redis = None
if "redis" in mode:
    import redis as redis_module
    redis = redis_module.Redis(host="127.0.0.1", port=6379, db=int(os.environ["BILLING_TEST_REDIS_DB"]))

def on_charged(entry):
    if "kill" in mode:  # the line is flushed, its transaction not committed
        os.kill(os.getpid(), signal.SIGKILL)
    if "slow" in mode:  # hold the worker's row a while: the other tick must wait for it
        time.sleep(0.05)

sync = Path(sync_dir)
(sync / f"ready-{name}").touch()
while not (sync / "go").exists():
    time.sleep(0.001)
report = charge_all(lambda: session_scope(url), redis, settings, datetime.fromisoformat(now_iso), on_charged)
print(json.dumps({"lines": [[e.key, e.amount] for e in report.charged], "errors": report.errors}))
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A freshly migrated database of this test's own: a copy of the session's SQLite template,
    or the session's PostgreSQL database emptied (tests/conftest.py); engines disposed after."""
    if request.param == "sqlite":
        return request.getfixturevalue("migrated_sqlite")(f"sqlite:///{tmp_path}/billing.db")
    return request.getfixturevalue("clean_postgres_url")


@pytest.fixture
def settings(url, tmp_path) -> Settings:
    return Settings(database_url=url, data_dir=tmp_path / "data")


def factory(url: str):
    return lambda: session_scope(url)


def make_world(url: str, settings: Settings, count: int, sync_rates: bool = True) -> tuple[str, list[str]]:
    """An account with 100 credits, a cpu model and ``count`` workers up since about T0."""
    with session_scope(url) as s:
        if sync_rates:
            rates.sync_settings(s, settings, EARLY)
        account, _ = accounts.create_account(s, "tick", signup_grant=Decimal(100))
        model = Model(account_id=account.id, name="m", hardware="cpu", status=ModelStatus.ACTIVE, max_workers=count)
        s.add(model)
        s.flush()
        ids = []
        for i in range(count):
            # heard from all along: a tick charges no further than a node's last heartbeat
            node = PoolNode(name=f"n{i}@host", host_class="cpu", last_seen=T0 + timedelta(days=1))
            s.add(node)
            s.flush()
            worker = Worker(
                account_id=account.id, model_id=model.id, node_name=node.name, status=WorkerStatus.UP, started_at=start_of(i)
            )
            s.add(worker)
            s.flush()
            node.worker_id = worker.id
            s.add(node)
            ids.append(worker.id)
        return account.id, ids


def start_of(i: int) -> datetime:
    return T0 + timedelta(milliseconds=137 * i, microseconds=11 * i)


def owed(start: datetime, end: datetime, rate: int = RUNTIME) -> int:
    return rate * (epoch_ms(end) - epoch_ms(start)) // MS_PER_HOUR


def spawn(
    url: str, settings: Settings, now: datetime, sync_dir: Path, names: list[str], mode: str, timeout: float = 60
) -> list[subprocess.CompletedProcess]:
    """Run one tick per name in child processes, started together; their results."""
    sync_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERPOOL_")}
    env["BILLING_TEST_REDIS_DB"] = str(REDIS_DB)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(settings.data_dir), now.isoformat(), str(sync_dir), name, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + timeout
        while not all((sync_dir / f"ready-{name}").exists() for name in names):
            assert time.monotonic() < deadline, "children never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (sync_dir / "go").touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def runtime_lines(url: str) -> list[LedgerEntry]:
    with session_scope(url) as s:
        return list(s.exec(select(LedgerEntry).where(col(LedgerEntry.worker_id).is_not(None)).order_by(col(LedgerEntry.id))))


def check_books(url: str, account_id: str) -> int:
    """balance == sum of lines == Account.balance_micro; each balance_after the running sum."""
    with session_scope(url) as s:
        lines = list(s.exec(select(LedgerEntry).where(LedgerEntry.account_id == account_id).order_by(col(LedgerEntry.id))))
        running = 0
        for line in lines:
            running += line.amount
            assert line.balance_after == running, line
        assert ledger.balance(s, account_id) == running == s.get(Account, account_id).balance_micro
        return running


def billed_to(url: str, worker_ids: list[str]) -> list[datetime | None]:
    with session_scope(url) as s:
        return [s.get(Worker, wid).billed_to for wid in worker_ids]


# -- two ticks at once -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "slow"], ids=["plain", "slow-commit"])
def test_two_ticks_in_parallel_processes_charge_each_period_once(url, settings, tmp_path, mode):
    # Given four workers up since about T0, each owed about 1 h
    account, ids = make_world(url, settings, count=4)
    now = T0 + timedelta(seconds=3599, microseconds=999_000)
    expected = sum(owed(start_of(i), now) for i in range(4))
    # When two ticks with the same `now` run at the same time, in two processes
    results = spawn(url, settings, now, tmp_path / "sync", ["a", "b"], mode)
    for result in results:
        assert result.returncode == 0, result.stderr
    reports = [json.loads(result.stdout.strip().splitlines()[-1]) for result in results]
    assert [r["errors"] for r in reports] == [[], []]
    # Then each period is charged exactly once, by one tick or the other
    charged = [tuple(line) for r in reports for line in r["lines"]]
    assert len(charged) == len(set(charged)) == 4
    lines = runtime_lines(url)
    assert sorted((line.key, line.amount) for line in lines) == sorted(charged)
    assert sorted(line.key for line in lines) == sorted(f"worker:{wid}:{epoch_us(start_of(i))}" for i, wid in enumerate(ids))
    assert -sum(line.amount for line in lines) == expected
    assert billed_to(url, ids) == [now] * 4
    assert check_books(url, account) == GRANT - expected
    # And another tick at that moment finds nothing left
    assert charge_all(factory(url), None, settings, now).charged == []


def test_two_ticks_in_parallel_on_a_database_with_no_rates_yet(url, settings, tmp_path):
    # Given no rate rows yet: both ticks record the settings' prices first
    account, ids = make_world(url, settings, count=2, sync_rates=False)
    now = T0 + timedelta(hours=1)
    results = spawn(url, settings, now, tmp_path / "sync", ["a", "b"], "fast")
    # Then neither tick fails, and each period is charged once
    for result in results:
        assert result.returncode == 0, result.stderr
    lines = runtime_lines(url)
    assert len(lines) == 2 and len({line.key for line in lines}) == 2
    assert check_books(url, account) == GRANT - sum(owed(start_of(i), now) for i in range(2))


# -- a tick killed before its commit ---------------------------------------------------------


def test_a_tick_killed_between_charge_and_commit_charges_nothing_and_the_next_charges_once(url, settings, tmp_path):
    # Given two workers owed about 2 h
    account, ids = make_world(url, settings, count=2)
    now = T0 + timedelta(hours=2, milliseconds=5)
    # When a tick is killed (SIGKILL) right after its first line is flushed, before the commit
    (result,) = spawn(url, settings, now, tmp_path / "sync", ["killed"], "kill")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    # Then nothing was charged and no billing mark moved
    assert runtime_lines(url) == []
    assert billed_to(url, ids) == [None, None]
    assert check_books(url, account) == GRANT
    # And the next tick charges the whole interval, once
    report = charge_all(factory(url), None, settings, now)
    expected = sum(owed(start_of(i), now) for i in range(2))
    assert report.errors == [] and report.total == expected
    lines = runtime_lines(url)
    assert [(line.period_start, line.period_end) for line in lines] == [(start_of(0), now), (start_of(1), now)]
    assert billed_to(url, ids) == [now, now]
    assert check_books(url, account) == GRANT - expected
    assert charge_all(factory(url), None, settings, now).charged == []


@pytest.fixture
def redis_db():
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_a_tick_killed_while_charging_shared_execution_leaves_the_minute_to_the_next(url, settings, tmp_path, redis_db, request):
    # (SQLite once committed the line at its savepoint's release, before the tick's commit.)
    # Given 2.5 s of shared computation in a finished minute
    account, _ = make_world(url, settings, count=0)
    with session_scope(url) as s:
        model_id = s.exec(select(Model.id).where(Model.account_id == account)).one()
    minute = bucket_of(T0.timestamp())
    record_execution(redis_db, account, model_id, "default", 2.5, T0.timestamp())
    now = datetime.fromtimestamp((minute + 1) * BUCKET_S + 10, UTC)
    # When a tick is killed right after flushing its line
    (result,) = spawn(url, settings, now, tmp_path / "sync", ["killed"], "kill-redis")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    # Then the minute is still pending (for the next tick), and nothing was charged
    assert redis_db.smembers(SHARED_PENDING_KEY) == {f"{account}:{minute}".encode()}
    assert check_books(url, account) == GRANT
    # And the next tick charges it once: one line of 2500 micro-credits
    report = charge_all(factory(url), redis_db, settings, now)
    assert report.errors == []
    assert redis_db.smembers(SHARED_PENDING_KEY) == set()
    with session_scope(url) as s:
        lines = list(s.exec(select(LedgerEntry).where(LedgerEntry.kind == "execution")))
    assert [(line.key, line.amount) for line in lines] == [(f"exec:{account}:{model_id}:default:{minute}", -2500)]
    assert check_books(url, account) == GRANT - 2500
    assert report.total == 2500  # charged by this tick, not by the killed one


# -- a tick run twice ------------------------------------------------------------------------


def test_a_tick_run_twice_with_the_same_now_charges_nothing_the_second_time(url, settings):
    account, ids = make_world(url, settings, count=3)
    now = T0 + timedelta(minutes=59, seconds=59, milliseconds=999)
    first = charge_all(factory(url), None, settings, now)
    expected = sum(owed(start_of(i), now) for i in range(3))
    assert first.errors == [] and first.total == expected and len(first.charged) == 3
    second = charge_all(factory(url), None, settings, now)
    assert second.charged == [] and second.errors == []
    assert len(runtime_lines(url)) == 3
    assert billed_to(url, ids) == [now] * 3
    assert check_books(url, account) == GRANT - expected
