"""What billing costs: one beat tick over many running workers, and a month's usage report.

Prints (medians of --rounds):
  * one tick charging --workers running workers (one line each), on SQLite (the embedded
    default) and on PostgreSQL when one answers on 127.0.0.1:5432: total and per worker;
  * a tick with nothing owed (every worker charged up to now): what beat costs when idle;
  * usage() and report() over a ledger of a day of 60-second ticks for 5 workers (7200 lines).

Usage: .venv/bin/python benchmarks/billing_tick.py [--workers 200] [--rounds 3]
Figures, not assertions: docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path


def setup(url: str, workers: int, started_ago: timedelta):
    from cipherpool.clock import utcnow
    from cipherpool.db import init_db, session_scope
    from cipherpool.db.tables import Model, PoolNode, Worker, WorkerStatus
    from cipherpool.services.accounts import create_account

    init_db(url)
    start = utcnow() - started_ago
    with session_scope(url) as session:
        account, _ = create_account(session, f"bench-{uuid.uuid4().hex[:6]}", signup_grant=Decimal(1_000_000))
        model = Model(account_id=account.id, name="m", max_workers=workers)
        session.add(model)
        session.flush()
        for i in range(workers):
            node = PoolNode(name=f"n{i}-{uuid.uuid4().hex[:6]}@bench", profile="default")
            session.add(node)
            session.flush()
            session.add(
                Worker(account_id=account.id, model_id=model.id, node_name=node.name, status=WorkerStatus.UP, started_at=start)
            )
        return account.id


def time_tick(url: str, settings, now) -> float:
    from cipherpool.billing.charging import charge_all
    from cipherpool.db import session_scope

    started = time.perf_counter()
    report = charge_all(lambda: session_scope(url), None, settings, now)
    elapsed = time.perf_counter() - started
    assert not report.errors, report.errors
    return elapsed


def bench_ticks(name: str, url: str, workers: int, rounds: int) -> None:
    from cipherpool.clock import utcnow
    from cipherpool.config.settings import Settings

    settings = Settings()
    owed, idle = [], []
    for r in range(rounds):
        setup(url, workers, timedelta(minutes=1))
        now = utcnow()
        owed.append(time_tick(url, settings, now))
        idle.append(time_tick(url, settings, now))
        _ = r
    print(
        f"{name}: tick over {workers} workers owing a minute: {statistics.median(owed) * 1000:.0f} ms "
        f"({statistics.median(owed) / workers * 1000:.2f} ms per worker); "
        f"nothing owed: {statistics.median(idle) * 1000:.0f} ms"
    )


def bench_report(url: str, rounds: int) -> None:
    from sqlmodel import select

    from cipherpool.billing import ledger
    from cipherpool.billing.usage import report, usage
    from cipherpool.clock import utcnow
    from cipherpool.db import session_scope
    from cipherpool.db.tables import Worker
    from cipherpool.statuses import LedgerKind

    account_id = setup(url, 5, timedelta(days=1))
    with session_scope(url) as session:
        workers = list(session.exec(select(Worker).where(Worker.account_id == account_id)))
        day = utcnow().replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        for worker in workers:
            for minute in range(1440):
                start = day + timedelta(minutes=minute)
                ledger.append(
                    session,
                    account_id,
                    LedgerKind.RUNTIME,
                    -16_666,
                    f"bench:{worker.id}:{minute}",
                    model_id=worker.model_id,
                    worker_id=worker.id,
                    period_start=start,
                    period_end=start + timedelta(minutes=1),
                    quantity_ms=60_000,
                    rate=1_000_000,
                    at=start + timedelta(minutes=1),
                )
    period = f"{day:%Y-%m}"
    for what, fn in (
        ("usage (a day)", lambda s: usage(s, None, account_id, day, day + timedelta(days=1))),
        ("report (the month)", lambda s: report(s, None, account_id, period)),
    ):
        times = []
        for _ in range(rounds):
            with session_scope(url) as session:
                started = time.perf_counter()
                fn(session)
                times.append(time.perf_counter() - started)
        print(f"{what} over 7200 runtime lines: {statistics.median(times) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        bench_ticks("SQLite", url, args.workers, args.rounds)
        bench_report(url, args.rounds)
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=1) as conn:
            name = f"cipherpool_bench_{uuid.uuid4().hex[:8]}"
            conn.execute(f'CREATE DATABASE "{name}"')
            try:
                bench_ticks("PostgreSQL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", args.workers, args.rounds)
            finally:
                from cipherpool.db import get_engine

                get_engine.cache_clear()
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL here: SQLite's figures stand
        print(f"PostgreSQL: skipped ({type(exc).__name__})")


if __name__ == "__main__":
    main()
