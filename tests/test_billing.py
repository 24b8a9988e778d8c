"""Billing: the exact arithmetic of runtime, standby and shared-execution charges, and the ledger.

Every expected amount is an exact integer of micro-credits. Tests that only call ``settle`` on
their own worker share one database per backend (each test has its own host class, so its own
rate rows); tests that run a whole tick (``charge_all`` charges every worker of the database)
or that look at whole ledgers get a database of their own through ``db_url``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlmodel import col, select

from cipherpool.billing import ledger, rates
from cipherpool.billing.charging import (
    BUCKET_S,
    bucket_of,
    charge_all,
    days,
    epoch_ms,
    epoch_us,
    record_execution,
    settle,
    unbilled_workers,
)
from cipherpool.billing.money import MS_PER_HOUR, show, to_credits, to_micro
from cipherpool.billing.payments import grant
from cipherpool.clock import utcnow
from cipherpool.db import get_engine, init_db, session_scope
from cipherpool.db.tables import Account, LedgerEntry, Model, ModelStatus, PoolNode, Rate, Worker, WorkerStatus
from cipherpool.errors import AccountNotFound, InvalidInput
from cipherpool.names import SHARED_PENDING_KEY
from cipherpool.services import accounts
from cipherpool.services import workers as worker_service
from cipherpool.statuses import LedgerKind

H = MS_PER_HOUR
T0 = datetime(2030, 3, 14, 9, 26, 53, 589_793, tzinfo=UTC)  # a fraction of a millisecond, on purpose
EARLY = datetime(2000, 1, 1, tzinfo=UTC)  # rate rows of a test take effect long before its worker starts
RUNTIME, STANDBY = 1_000_000, 100_000  # micro-credits per hour: the default cpu prices


def at(seconds: float, start: datetime = T0) -> datetime:
    return start + timedelta(seconds=seconds)


def owed(rate: int, start: datetime, end: datetime) -> int:
    """⌊rate × ms / 3 600 000⌋ with ms counted as the code counts it (epoch milliseconds)."""
    return rate * (epoch_ms(end) - epoch_ms(start)) // H


# -- money ------------------------------------------------------------------------------------


def test_decimal_amounts_add_up_exactly():
    assert to_micro("0.1") + to_micro("0.2") == to_micro("0.3") == 300_000
    assert to_micro(Decimal("0.1")) * 3 == to_micro("0.3")


@pytest.mark.parametrize(
    ("credits", "micro"),
    [
        ("1", 1_000_000),
        ("0.000001", 1),
        ("1e-6", 1),
        ("-2.5", -2_500_000),
        (Decimal("12.345678"), 12_345_678),
        (3, 3_000_000),
        ("0", 0),
        ("1.500000000", 1_500_000),  # trailing zeros beyond six decimals are not finer
        ("123456789.123456", 123_456_789_123_456),
    ],
    ids=["one", "one-micro", "exponent", "negative", "decimal", "int", "zero", "trailing-zeros", "large"],
)
def test_to_micro_table(credits, micro):
    assert to_micro(credits) == micro
    assert isinstance(to_micro(credits), int)


@pytest.mark.parametrize(
    "credits",
    ["0.0000001", "1.0000005", "-0.0000001", "abc", "", "NaN", "Infinity", "1,5"],
    ids=["seven-decimals", "half-micro", "negative-finer", "word", "empty", "nan", "infinity", "comma"],
)
def test_to_micro_refuses_what_is_not_a_whole_micro_credit(credits):
    with pytest.raises(InvalidInput):
        to_micro(credits, "price")


@pytest.mark.parametrize(
    ("micro", "shown"),
    [
        (12_500_000, "12.5"),
        (1, "0.000001"),
        (-3_000_000, "-3"),
        (0, "0"),
        (1_000_000, "1"),
        (-1, "-0.000001"),
        (123_456_789, "123.456789"),
        (10_000_000, "10"),
    ],
    ids=["half", "one-micro", "negative", "zero", "one", "negative-micro", "six-decimals", "ten"],
)
def test_show_table(micro, shown):
    assert show(micro) == shown
    assert to_micro(shown) == micro  # what a person reads back is the exact amount


@pytest.mark.parametrize("micro", [0, 1, -1, 999_999, 1_000_001, -123_456_789, 10**15 + 7])
def test_to_credits_round_trips(micro):
    credits = to_credits(micro)
    assert credits.as_tuple().exponent == -6
    assert to_micro(credits) == micro


# -- a database per backend for the settle-only tests ----------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def books(request, tmp_path_factory):
    """One migrated database per backend for the tests that settle only their own worker."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('billing')}/billing.db"
        init_db(url)
        yield url
        get_engine(url).dispose()
        return
    from tests.conftest import _postgres_database

    with _postgres_database() as url:
        init_db(url)
        yield url
        get_engine(url).dispose()


@dataclass
class Rig:
    url: str
    host_class: str
    profile: str
    account_id: str
    model_id: str
    node: str
    worker_id: str


def make_worker(
    url: str,
    *,
    started_at: datetime | None = T0,
    status: WorkerStatus = WorkerStatus.UP,
    runtime: int = RUNTIME,
    standby: int = STANDBY,
    execution: int = 1000,
    profile_prices: dict | None = None,
) -> Rig:
    """An account (balance 0), an active model, a node of a host class of its own with class
    prices from EARLY on (and its profile's, if given), and a worker on it."""
    tag = uuid.uuid4().hex[:10]
    host_class, profile = f"c{tag}", f"p{tag}"
    with session_scope(url) as s:
        s.add(
            Rate(
                scope=host_class,
                effective_from=EARLY,
                runtime_per_hour=runtime,
                standby_per_hour=standby,
                execution_per_s=execution,
                source="test",
            )
        )
        if profile_prices is not None:
            s.add(Rate(scope=rates.profile_scope(profile), effective_from=EARLY, source="test", **profile_prices))
        account = Account(name=f"a{tag}", api_key_hash=f"h{tag}", api_key_prefix="cpk_test")
        s.add(account)
        s.flush()
        model = Model(account_id=account.id, name="m", hardware=host_class, status=ModelStatus.ACTIVE)
        node = PoolNode(name=f"n{tag}@host", host_class=host_class, profile=profile)
        s.add(model)
        s.add(node)
        s.flush()
        worker = Worker(account_id=account.id, model_id=model.id, node_name=node.name, status=status, started_at=started_at)
        s.add(worker)
        s.flush()
        node.worker_id = worker.id
        s.add(node)
        return Rig(url, host_class, profile, account.id, model.id, node.name, worker.id)


def charge(rig: Rig, until: datetime) -> list[LedgerEntry]:
    with session_scope(rig.url) as s:
        return settle(s, rig.worker_id, until)


def set_status(rig: Rig, status: WorkerStatus) -> None:
    with session_scope(rig.url) as s:
        worker = s.get(Worker, rig.worker_id)
        worker.status = status
        s.add(worker)


def add_rate(url: str, scope: str, effective_from: datetime, **prices: int | None) -> None:
    with session_scope(url) as s:
        s.add(Rate(scope=scope, effective_from=effective_from, source="test", **prices))


def worker_lines(rig: Rig) -> list[LedgerEntry]:
    with session_scope(rig.url) as s:
        return list(s.exec(select(LedgerEntry).where(LedgerEntry.worker_id == rig.worker_id).order_by(col(LedgerEntry.id))))


def worker_row(rig: Rig) -> Worker:
    with session_scope(rig.url) as s:
        return s.get(Worker, rig.worker_id)


def check_books(url: str, account_id: str) -> int:
    """balance == sum of lines == Account.balance_micro, and each balance_after is the running sum."""
    with session_scope(url) as s:
        lines = list(s.exec(select(LedgerEntry).where(LedgerEntry.account_id == account_id).order_by(col(LedgerEntry.id))))
        running = 0
        for line in lines:
            running += line.amount
            assert line.balance_after == running, line
        assert ledger.balance(s, account_id) == running
        assert s.get(Account, account_id).balance_micro == running
        return running


def check_contiguous(rig: Rig, lines: list[LedgerEntry], start: datetime, end: datetime) -> None:
    """The lines cover [start, end) without gap or overlap, each keyed by its period's start."""
    assert lines, "no line"
    assert lines[0].period_start == start and lines[-1].period_end == end
    for a, b in zip(lines, lines[1:]):
        assert a.period_end == b.period_start
    assert [line.key for line in lines] == [f"worker:{rig.worker_id}:{epoch_us(line.period_start)}" for line in lines]
    assert len({line.key for line in lines}) == len(lines)
    assert sum(line.quantity_ms for line in lines) == epoch_ms(end) - epoch_ms(start)


# -- runtime: partial intervals ---------------------------------------------------------------


PARTIAL = [
    # rate (micro-credits/h), tick offsets from T0 (s), exact total charged
    pytest.param(1_000_000, [7.3], 2027, id="one-7.3s-tick"),
    pytest.param(1_000_000, [7.3, 60, 61.001, 3599.999], 999_999, id="odd-ticks-1-credit-per-h"),
    pytest.param(7_777_777, [7.3, 60, 61.001, 3599.999], 7_777_774, id="odd-ticks-odd-rate"),
    pytest.param(1, [60 * i for i in range(1, 91)], 1, id="1-micro-per-h-minute-ticks"),
    pytest.param(3_600_000, [0.0004, 1.0004, 2.5], 2500, id="sub-millisecond-offsets"),
    pytest.param(123_457, [0.999, 1.0], 34, id="a-millisecond-apart"),
    pytest.param(4_000_000, [round(59.017 * i, 3) for i in range(1, 62)], 4_000_041, id="gpu-61-odd-ticks"),
    pytest.param(1_000_000, [3600 * k for k in range(1, 27)] + [93_600.5], 26_000_138, id="hourly-over-midnight"),
]


@pytest.mark.parametrize(("rate", "offsets", "total"), PARTIAL)
def test_partial_intervals_add_up_to_the_exact_total(books, rate, offsets, total):
    # Given a worker up since T0 at `rate`
    rig = make_worker(books, runtime=rate)
    # When ticks charge it at arbitrary moments
    ticks = [at(s) for s in offsets]
    for tick in ticks:
        charge(rig, tick)
    # Then the charges add up to ⌊rate × total ms / 1 h⌋, exactly, whatever the split
    lines = worker_lines(rig)
    assert total == owed(rate, T0, ticks[-1])
    assert -sum(line.amount for line in lines) == total
    assert all(line.amount <= 0 and line.kind == LedgerKind.RUNTIME.value for line in lines)
    check_contiguous(rig, lines, T0, ticks[-1])
    # one line per tick, and one more per UTC midnight inside a tick
    bounds = [T0, *ticks]
    assert len(lines) == sum(len(list(days(a, b))) for a, b in zip(bounds, bounds[1:]))
    worker = worker_row(rig)
    assert worker.billed_to == ticks[-1]
    assert worker.billed_remainder == rate * (epoch_ms(ticks[-1]) - epoch_ms(T0)) % H  # the fraction, carried
    assert check_books(books, rig.account_id) == -total


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed-{s}")
def test_random_splits_never_change_the_total(books, seed):
    rng = random.Random(seed)
    rate = rng.choice([1, 7, 999_999, 1_000_000, 3_333_333, rng.randint(1, 50_000_000)])
    start = T0 + timedelta(microseconds=rng.randint(0, 10**6))
    rig = make_worker(books, runtime=rate, started_at=start)
    # Given ticks at random moments (at least a millisecond apart), some over a midnight
    tick, ticks = start, []
    for _ in range(rng.randint(1, 30)):
        tick = tick + timedelta(
            milliseconds=rng.choice([1, rng.randint(1, 999), rng.randint(1, 7_200_000)]), microseconds=rng.randint(0, 999)
        )
        ticks.append(tick)
    # When each one charges
    for tick in ticks:
        charge(rig, tick)
    # Then the lines tile [start, last tick) and sum to the one-shot amount
    lines = worker_lines(rig)
    expected = owed(rate, start, ticks[-1])
    assert -sum(line.amount for line in lines) == expected
    check_contiguous(rig, lines, start, ticks[-1])
    assert check_books(books, rig.account_id) == -expected
    # And one charge of the whole period on a twin worker gives the same amount
    twin = make_worker(books, runtime=rate, started_at=start)
    charge(twin, ticks[-1])
    assert sum(line.amount for line in worker_lines(twin)) == -expected


# -- runtime: boundaries and UTC midnight ----------------------------------------------------


def d(day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0, month: int = 3, year: int = 2030):
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


BOUNDARIES = [
    # start, ticks, rate, expected lines (period start, period end, amount charged)
    pytest.param(
        d(14, 10),
        [d(14, 11), d(14, 12)],
        1_000_000,
        [(d(14, 10), d(14, 11), 1_000_000), (d(14, 11), d(14, 12), 1_000_000)],
        id="on-the-hour",
    ),
    pytest.param(
        d(14, 23, 30, 0, 250_000),
        [d(15, 0, 30, 0, 250_000)],
        1_234_567,
        [(d(14, 23, 30, 0, 250_000), d(15), 617_197), (d(15), d(15, 0, 30, 0, 250_000), 617_370)],
        id="crossing-midnight",
    ),
    pytest.param(
        d(14, 23),
        [d(15), d(15, 1)],
        1_000_000,
        [(d(14, 23), d(15), 1_000_000), (d(15), d(15, 1), 1_000_000)],
        id="tick-exactly-at-midnight",
    ),
    pytest.param(
        d(14, 22),
        [d(16, 2)],
        1_000_000,
        [(d(14, 22), d(15), 2_000_000), (d(15), d(16), 24_000_000), (d(16), d(16, 2), 2_000_000)],
        id="two-midnights-in-one-tick",
    ),
    pytest.param(
        d(31, 23, 59, 59, 999_000, month=12),
        [d(1, 0, 0, 0, 1000, month=1, year=2031)],
        3_600_000,
        [
            (d(31, 23, 59, 59, 999_000, month=12), d(1, month=1, year=2031), 1),
            (d(1, month=1, year=2031), d(1, 0, 0, 0, 1000, month=1, year=2031), 1),
        ],
        id="new-year",
    ),
    pytest.param(
        d(14, 23, 59, 59, 999_999),
        [d(15, 0, 0, 0, 1)],
        3_600_000_000,
        [(d(14, 23, 59, 59, 999_999), d(15), 1_000), (d(15), d(15, 0, 0, 0, 1), 0)],
        id="microseconds-around-midnight",
    ),
]


@pytest.mark.parametrize(("start", "ticks", "rate", "expected"), BOUNDARIES)
def test_ticks_on_boundaries_and_midnight(books, start, ticks, rate, expected):
    rig = make_worker(books, runtime=rate, started_at=start)
    for tick in ticks:
        charge(rig, tick)
    lines = worker_lines(rig)
    assert [(line.period_start, line.period_end, -line.amount) for line in lines] == expected
    assert [line.key for line in lines] == [f"worker:{rig.worker_id}:{epoch_us(a)}" for a, _, _ in expected]
    assert len({line.key for line in lines}) == len(lines)
    for line in lines:  # a line never spans a UTC midnight
        assert line.period_start.date() == (line.period_end - timedelta(microseconds=1)).date()
    assert -sum(line.amount for line in lines) == owed(rate, start, ticks[-1])
    check_books(books, rig.account_id)


def test_a_line_says_what_it_charges(books):
    rig = make_worker(books, runtime=2_500_000)
    (line,) = charge(rig, at(1800))
    assert line.key == f"worker:{rig.worker_id}:{epoch_us(T0)}"
    assert (line.kind, line.amount, line.rate, line.quantity_ms) == (LedgerKind.RUNTIME.value, -1_250_000, 2_500_000, 1_800_000)
    assert (line.account_id, line.model_id, line.worker_id, line.node) == (rig.account_id, rig.model_id, rig.worker_id, rig.node)
    assert (line.period_start, line.period_end) == (T0, at(1800))
    assert "2.5 credits/h" in line.note


def test_settling_again_at_the_same_moment_or_earlier_charges_nothing(books):
    rig = make_worker(books)
    assert len(charge(rig, at(600))) == 1
    assert charge(rig, at(600)) == []
    assert charge(rig, at(300)) == []  # a tick with an older clock
    assert worker_row(rig).billed_to == at(600)
    assert -sum(line.amount for line in worker_lines(rig)) == owed(RUNTIME, T0, at(600))


def test_a_worker_not_started_owes_nothing(books):
    rig = make_worker(books, started_at=None, status=WorkerStatus.LOADING)
    assert charge(rig, at(3600)) == []
    assert worker_row(rig).billed_to is None
    with session_scope(books) as s:
        assert rig.worker_id not in unbilled_workers(s)


# -- runtime: rate changes -------------------------------------------------------------------


RATE_CHANGES = [
    # changes (scope "class"/"profile", offset s, runtime), ticks (offsets s), amounts per line
    pytest.param([("class", 1800, 3_000_000)], [3600], [2_000_000], id="class-change-halfway"),
    pytest.param([("class", 1234.567, 999_999)], [3599.999], [999_999], id="odd-change-odd-tick"),
    pytest.param([("class", 3600, 2_000_000)], [3600, 7200], [1_000_000, 2_000_000], id="change-exactly-on-a-tick"),
    pytest.param([("class", 600, 2_000_000), ("class", 1200, 500_000)], [1800], [583_333], id="two-changes-one-tick"),
    pytest.param(
        [("profile", 1800, 4_000_000), ("class", 900, 9_000_000)], [3600], [3_000_000], id="profile-change-beats-class-change"
    ),
    pytest.param(
        [("class", 15 * 3600, 2_000_000)], [16 * 3600], [14_551_780, 2_448_220], id="change-after-midnight-in-a-crossing-tick"
    ),
]


@pytest.mark.parametrize(("changes", "ticks", "amounts"), RATE_CHANGES)
def test_rate_changes_mid_period_price_each_part_at_its_rate(books, changes, ticks, amounts):
    odd = any(offset == 1234.567 for _, offset, _ in changes)
    has_profile = any(scope == "profile" for scope, _, _ in changes)
    rig = make_worker(
        books, runtime=1_000_001 if odd else RUNTIME, profile_prices={"runtime_per_hour": 2_000_000} if has_profile else None
    )
    for scope, offset, runtime in changes:
        add_rate(
            books,
            rig.host_class if scope == "class" else rates.profile_scope(rig.profile),
            at(offset),
            runtime_per_hour=runtime,
            standby_per_hour=STANDBY,
        )
    for offset in ticks:
        charge(rig, at(offset))
    lines = worker_lines(rig)
    assert [-line.amount for line in lines] == amounts
    check_contiguous(rig, lines, T0, at(ticks[-1]))
    check_books(books, rig.account_id)


def test_a_rate_change_never_reprices_time_already_charged(books):
    # Given the first hour charged at 1 credit/h
    rig = make_worker(books)
    (first,) = charge(rig, at(3600))
    assert first.amount == -1_000_000
    # When a rate row is added back-dated into that hour (an operator's mistake, or a late sync)
    add_rate(books, rig.host_class, at(1800), runtime_per_hour=5_000_000, standby_per_hour=STANDBY)
    (second,) = charge(rig, at(7200))
    # Then the hour already charged stays as it was; only time after it is at the new rate
    lines = worker_lines(rig)
    assert [line.amount for line in lines] == [-1_000_000, -5_000_000]
    assert lines[0].id == first.id and lines[0].balance_after == -1_000_000
    assert check_books(books, rig.account_id) == -6_000_000


def test_sync_records_a_change_only_and_never_back_in_time(books):
    scope = f"c{uuid.uuid4().hex[:10]}"
    with session_scope(books) as s:
        # A class's first row is what the settings said all along: it covers the time before it.
        first = rates.sync(s, scope, rates.PriceChange(1_000_000, 100_000, 1000), "settings", at(0))
        assert first is not None and first.effective_from == rates.EPOCH
        assert rates.sync(s, scope, rates.PriceChange(1_000_000, 100_000, 1000), "settings", at(60)) is None
        second = rates.sync(s, scope, rates.PriceChange(2_000_000, 100_000, 1000), "settings", at(0))
        assert second is not None and second.effective_from == at(0)
        later = rates.sync(s, scope, rates.PriceChange(3_000_000, 100_000, 1000), "settings", at(-3600))
        assert later is not None and later.effective_from == second.effective_from  # not before the row in force
        assert rates.sync(s, f"profile:{scope}", rates.PriceChange(), "profiles") is None  # nothing set: no row
        assert rates.prices_at(s, scope, None, at(1)) == rates.Prices(3_000_000, 100_000, 1000)
        assert rates.prices_at(s, scope, None, at(-1)) == rates.Prices(1_000_000, 100_000, 1000)
        # A profile's first price applies from its time on; before it, its class's.
        profile = f"p{uuid.uuid4().hex[:8]}"
        own = rates.sync(s, f"profile:{profile}", rates.PriceChange(9_000_000, None, None), "profiles", at(10))
        assert own is not None and own.effective_from == at(10)
        assert rates.prices_at(s, scope, profile, at(9)).runtime_per_hour == 3_000_000
        assert rates.prices_at(s, scope, profile, at(11)) == rates.Prices(9_000_000, 100_000, 1000)
        # a scope with no row at all: the settings' prices (0 for a class they do not name)
        assert rates.prices_at(s, scope + "x", None, at(1)) == rates.Prices(0, 0, 0)


def test_segments_cut_where_a_class_or_profile_price_changed(books):
    rig = make_worker(books, profile_prices={"standby_per_hour": 7})
    add_rate(books, rig.host_class, at(100), runtime_per_hour=2_000_000, standby_per_hour=STANDBY)
    add_rate(books, rates.profile_scope(rig.profile), at(200), runtime_per_hour=3_000_000)
    add_rate(books, rig.host_class, at(900), runtime_per_hour=4_000_000)  # after the period: no cut
    with session_scope(books) as s:
        pieces = rates.segments(s, rig.host_class, rig.profile, T0, at(300))
    assert [(a, b, p.runtime_per_hour, p.standby_per_hour) for a, b, p in pieces] == [
        (T0, at(100), 1_000_000, 7),
        (at(100), at(200), 2_000_000, 7),
        (at(200), at(300), 3_000_000, STANDBY),
    ]


# -- a profile's own rate --------------------------------------------------------------------


PROFILES = [
    # the profile's row, the worker's state, the rate it is charged per hour
    pytest.param({"runtime_per_hour": 2_500_000}, WorkerStatus.UP, 2_500_000, id="profile-runtime-beats-class"),
    pytest.param(
        {"runtime_per_hour": None, "standby_per_hour": 200_000}, WorkerStatus.UP, RUNTIME, id="profile-none-runtime-falls-back"
    ),
    pytest.param(
        {"runtime_per_hour": None, "standby_per_hour": 200_000}, WorkerStatus.STANDBY, 200_000, id="profile-standby-beats-class"
    ),
    pytest.param({"runtime_per_hour": 5_000_000}, WorkerStatus.STANDBY, STANDBY, id="profile-without-standby"),
    pytest.param({}, WorkerStatus.UP, RUNTIME, id="profile-row-all-none"),
    pytest.param({"runtime_per_hour": 0}, WorkerStatus.UP, 0, id="profile-free-is-not-none"),
    pytest.param(None, WorkerStatus.STOPPING, RUNTIME, id="no-profile-row-stopping-is-runtime"),
]


@pytest.mark.parametrize(("profile_prices", "status", "rate"), PROFILES)
def test_a_profiles_own_rate_beats_its_class(books, profile_prices, status, rate):
    rig = make_worker(books, status=status, profile_prices=profile_prices)
    lines = charge(rig, at(5400))
    kind = LedgerKind.STANDBY if status == WorkerStatus.STANDBY else LedgerKind.RUNTIME
    assert [(line.kind, line.rate, -line.amount) for line in lines] == [(kind.value, rate, rate * 3 // 2)]


def test_another_profiles_row_does_not_apply(books):
    rig = make_worker(books)
    add_rate(books, rates.profile_scope(rig.profile + "x"), EARLY, runtime_per_hour=9_000_000)
    assert [line.amount for line in charge(rig, at(3600))] == [-RUNTIME]


# -- standby ---------------------------------------------------------------------------------


def test_standby_timeline_prices_each_state_at_its_rate(books):
    # Given a worker up at T0 with runtime 1 credit/h, standby 0.1 credit/h
    rig = make_worker(books, runtime=1_000_003, standby=100_001)
    # When it runs 1 h, waits on standby 2 h 0.5 s, runs again 1 h (each change settled first)
    charge(rig, at(3600))
    set_status(rig, WorkerStatus.STANDBY)
    charge(rig, at(10_800.5))
    set_status(rig, WorkerStatus.UP)
    charge(rig, at(14_400.5))
    # Then runtime before, standby during, runtime after, with the remainder carried throughout
    lines = worker_lines(rig)
    assert [line.kind for line in lines] == ["runtime", "standby", "runtime"]
    numerator = 1_000_003 * 3_600_000
    first, numerator = divmod(numerator, H)
    second, numerator = divmod(numerator + 100_001 * 7_200_500, H)
    third, _ = divmod(numerator + 1_000_003 * 3_600_000, H)
    assert [-line.amount for line in lines] == [first, second, third] == [1_000_003, 200_015, 1_000_003]
    check_contiguous(rig, lines, T0, at(14_400.5))


def test_set_consuming_settles_at_the_state_it_leaves(books):
    # Given a worker up for about an hour (times relative to the real clock: set_consuming uses it)
    start = utcnow() - timedelta(hours=1, milliseconds=123)
    rig = make_worker(books, started_at=start, runtime=1_000_003, standby=100_001)
    # When it goes on standby now
    with session_scope(books) as s:
        worker_service.set_consuming(s, rig.worker_id, False)
    worker = worker_row(rig)
    ts = worker.billed_to
    assert worker.status == WorkerStatus.STANDBY and start < ts <= utcnow()
    # Then the time before is charged at once, at the runtime rate (two lines if a UTC midnight fell in it)
    up = worker_lines(rig)
    assert {line.kind for line in up} == {"runtime"} and up[-1].period_end == ts
    assert -sum(line.amount for line in up) == owed(1_000_003, start, ts)
    # And the next tick charges the time after at the standby rate, the remainder carried
    wait = charge(rig, ts + timedelta(minutes=30))
    assert {(line.kind, line.rate) for line in wait} == {("standby", 100_001)}
    numerator = 1_000_003 * (epoch_ms(ts) - epoch_ms(start)) % H + 100_001 * 1_800_000
    assert -sum(line.amount for line in wait) == numerator // H
    # And resuming (before the time already charged: nothing more) makes the next tick runtime again
    with session_scope(books) as s:
        worker_service.set_consuming(s, rig.worker_id, True)
    assert worker_row(rig).status == WorkerStatus.UP
    again = charge(rig, ts + timedelta(minutes=90))
    assert {line.kind for line in again} == {"runtime"}
    assert -sum(line.amount for line in again) == (numerator % H + 1_000_003 * 3_600_000) // H
    check_contiguous(rig, worker_lines(rig), start, ts + timedelta(minutes=90))
    check_books(books, rig.account_id)


# -- stop and lost nodes ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [WorkerStatus.UP, WorkerStatus.STANDBY, WorkerStatus.STOPPING])
def test_a_stop_between_ticks_charges_the_rest_at_once_and_nothing_after(books, status):
    start = utcnow() - timedelta(hours=2, microseconds=777)
    rig = make_worker(books, started_at=start, status=status)
    rate = STANDBY if status == WorkerStatus.STANDBY else RUNTIME
    # Given a tick an hour ago
    charge(rig, start + timedelta(hours=1, milliseconds=300))
    # When the worker stops between ticks
    with session_scope(books) as s:
        worker_service.finish(s, rig.worker_id, WorkerStatus.STOPPED)
    worker = worker_row(rig)
    # Then the rest up to its stop is charged at once
    lines = worker_lines(rig)
    assert len(lines) in (2, 3)  # 3 if the last hour crossed a UTC midnight
    assert worker.billed_to == worker.stopped_at == lines[-1].period_end
    assert -sum(line.amount for line in lines) == owed(rate, start, worker.stopped_at)
    check_contiguous(rig, lines, start, worker.stopped_at)
    # And a later tick charges nothing more, nor lists it
    assert charge(rig, worker.stopped_at + timedelta(hours=5)) == []
    with session_scope(books) as s:
        assert rig.worker_id not in unbilled_workers(s)
        assert s.get(PoolNode, rig.node).worker_id is None
    # And stopping (or failing) it again changes nothing: not its stop, status, charges or events
    later = worker_row(rig)
    with session_scope(books) as s:
        worker_service.finish(s, rig.worker_id, WorkerStatus.FAILED, error="a late unbind")
    again = worker_row(rig)
    assert (again.status, again.stopped_at, again.billed_to, again.error) == (
        later.status,
        later.stopped_at,
        later.billed_to,
        later.error,
    )
    assert len(worker_lines(rig)) == len(lines)
    assert charge(rig, worker.stopped_at + timedelta(hours=6)) == []
    check_books(books, rig.account_id)


LOST = [
    # tick before (h ago, None: none), charge_until (h ago; negative: in the future), hours owed from start (3 h ago)
    pytest.param(2.5, 1.0, 2.0, id="charged-up-to-last-heartbeat"),
    pytest.param(None, 2.0, 1.0, id="no-tick-before"),
    pytest.param(1.0, 2.0, 2.0, id="heartbeat-before-last-tick-no-refund"),
    pytest.param(None, -1.0, 3.0, id="heartbeat-in-the-future-capped-at-now"),
]


@pytest.mark.parametrize(("tick_ago", "until_ago", "owed_hours"), LOST)
def test_a_lost_node_is_charged_only_up_to_its_last_heartbeat(books, tick_ago, until_ago, owed_hours):
    now = utcnow()
    start = now - timedelta(hours=3)
    rig = make_worker(books, started_at=start)
    if tick_ago is not None:
        charge(rig, now - timedelta(hours=tick_ago))
    # When the reconciler fails it, charging only up to the node's last heartbeat
    with session_scope(books) as s:
        worker_service.finish(
            s, rig.worker_id, WorkerStatus.FAILED, error="node lost", charge_until=now - timedelta(hours=until_ago)
        )
    worker = worker_row(rig)
    lines = worker_lines(rig)
    charged = -sum(line.amount for line in lines)
    if until_ago < 0:  # capped at the moment of the stop
        assert charged == owed(RUNTIME, start, worker.stopped_at)
    else:
        assert charged == owed(RUNTIME, start, start + timedelta(hours=owed_hours))
    # Then the silence after it is never charged, by any later tick
    assert worker.status == WorkerStatus.FAILED and worker.billed_to == worker.stopped_at
    assert charge(rig, worker.stopped_at + timedelta(days=2)) == []
    with session_scope(books) as s:
        assert rig.worker_id not in unbilled_workers(s)
    assert len(worker_lines(rig)) == len(lines)
    check_books(books, rig.account_id)


def test_a_worker_stopped_as_it_started_owes_nothing(books):
    rig = make_worker(books, started_at=T0, status=WorkerStatus.STOPPED)
    with session_scope(books) as s:
        worker = s.get(Worker, rig.worker_id)
        worker.stopped_at = T0
        s.add(worker)
    assert charge(rig, at(3600)) == []
    assert worker_row(rig).billed_to == T0
    with session_scope(books) as s:
        assert rig.worker_id not in unbilled_workers(s)


def test_a_stopped_worker_with_time_left_is_charged_up_to_its_stop_only(books):
    # Given a stop whose own charge did not happen (it died with its process)
    rig = make_worker(books, status=WorkerStatus.STOPPED)
    with session_scope(books) as s:
        worker = s.get(Worker, rig.worker_id)
        worker.stopped_at = at(1000)
        s.add(worker)
        assert rig.worker_id in unbilled_workers(s)
    # When a later tick settles it
    lines = charge(rig, at(7200))
    # Then it pays up to its stop, and is done
    assert [(line.period_end, -line.amount) for line in lines] == [(at(1000), owed(RUNTIME, T0, at(1000)))]
    with session_scope(books) as s:
        assert rig.worker_id not in unbilled_workers(s)


# -- regressions of bugs found in review ------------------------------------------------------
# A period's line was keyed by the millisecond of its start: a period starting in the same
# millisecond as the previous one (two settles within a millisecond, a tick just past UTC
# midnight) got the previous key, was refused, and the worker was never charged again.


@pytest.mark.parametrize(
    ("start", "ticks"),
    [
        pytest.param(T0, [at(60), at(60.0001), at(120), at(180)], id="two-settles-100us-apart"),
        pytest.param(d(14, 23, 59), [d(15, 0, 0, 0, 500), d(15, 0, 1), d(15, 0, 2)], id="tick-500us-after-midnight"),
    ],
)
def test_settles_within_one_millisecond_do_not_stop_billing(books, start, ticks):
    rig = make_worker(books, started_at=start)
    for tick in ticks:
        charge(rig, tick)
    assert worker_row(rig).billed_to == ticks[-1]
    assert -sum(line.amount for line in worker_lines(rig)) == owed(RUNTIME, start, ticks[-1])


# -- the ledger (a database of its own) ------------------------------------------------------


@pytest.fixture
def account_id(session):
    account, _ = accounts.create_account(session, "alice", signup_grant=Decimal(0))
    session.commit()
    return account.id


OPERATIONS = [
    ("grant", 100_000_000),
    ("runtime", -16_667),
    ("execution", -1),
    ("purchase", 5_000_000),
    ("standby", -2_777),
    ("adjustment", -100_000_001),
    ("refund", 3),
    ("runtime", -4_999_999),
]


def test_balance_is_the_sum_of_the_lines_after_every_operation(db_url, account_id):
    running = 0
    for i, (kind, amount) in enumerate(OPERATIONS):
        with session_scope(db_url) as s:
            entry = ledger.append(s, account_id, LedgerKind(kind), amount, f"op:{i}")
            running += amount
            # Then the line's balance_after, the cached balance and the sum agree, in the transaction
            assert entry.balance_after == running
            assert s.get(Account, account_id).balance_micro == running
            assert ledger.balance(s, account_id) == running
        assert check_books(db_url, account_id) == running  # and after the commit
    assert running == -19_442  # below zero is allowed: a tick charges what was used
    with session_scope(db_url) as s:
        charges = ledger.history(s, account_id, kinds=[LedgerKind.RUNTIME, LedgerKind.STANDBY, LedgerKind.EXECUTION])
        assert [line.amount for line in charges] == [-16_667, -1, -2_777, -4_999_999]


def test_a_duplicate_key_is_refused_and_changes_nothing(db_url, account_id):
    with session_scope(db_url) as s:
        assert ledger.append(s, account_id, LedgerKind.GRANT, 7_000_000, "k") is not None
    with session_scope(db_url) as s:
        # When the same key comes again, even with another amount
        assert ledger.append(s, account_id, LedgerKind.GRANT, 7_000_000, "k") is None
        assert ledger.append(s, account_id, LedgerKind.RUNTIME, -5, "k") is None
        # Then the transaction goes on, the balance unchanged
        assert s.get(Account, account_id).balance_micro == 7_000_000
        assert ledger.append(s, account_id, LedgerKind.RUNTIME, -5, "k2").balance_after == 6_999_995
    assert check_books(db_url, account_id) == 6_999_995
    with session_scope(db_url) as s:
        assert len(s.exec(select(LedgerEntry).where(LedgerEntry.account_id == account_id)).all()) == 2


def test_grants_are_idempotent_by_key(db_url, account_id):
    with session_scope(db_url) as s:
        first = grant(s, account_id, "2.5", key="welcome")
        again = grant(s, account_id, "2.5", key="welcome")
        assert again.id == first.id
    assert check_books(db_url, account_id) == 2_500_000
    with session_scope(db_url) as s, pytest.raises(InvalidInput):
        grant(s, account_id, "0.0000001")


def test_a_line_for_an_unknown_account_is_refused(db_url, account_id):
    with session_scope(db_url) as s:
        with pytest.raises(AccountNotFound):
            ledger.append(s, "nobody", LedgerKind.GRANT, 5, "x")
        assert ledger.append(s, account_id, LedgerKind.GRANT, 5, "x") is not None  # the key was not taken
    assert check_books(db_url, account_id) == 5


def test_the_signup_grant_is_the_first_line(db_url, session):
    account, _ = accounts.create_account(session, "bob")  # the settings' 100 credits
    session.commit()
    (line,) = ledger.history(session, account.id)
    assert (line.kind, line.amount, line.balance_after, line.key) == (
        "grant",
        100_000_000,
        100_000_000,
        f"grant:{account.id}:signup",
    )


def test_a_ledger_line_rolls_back_with_its_transaction(db_url, account_id, request):
    # (SQLite once committed such a line at its savepoint's release: pysqlite had begun no
    # transaction, so the SAVEPOINT began one of its own.)

    class Boom(Exception):
        pass

    # Given a transaction whose first write is a ledger line
    with pytest.raises(Boom), session_scope(db_url) as s:
        ledger.append(s, account_id, LedgerKind.GRANT, 9_000_000, "lost")
        raise Boom
    # Then rolling it back leaves no line and no balance
    with session_scope(db_url) as s:
        assert s.exec(select(LedgerEntry).where(LedgerEntry.key == "lost")).first() is None
        assert s.get(Account, account_id).balance_micro == 0


# -- whole ticks (a database of its own) -----------------------------------------------------


def make_tick_world(url: str, settings, count: int = 2, start: datetime = T0) -> tuple[str, list[str]]:
    """An account with 100 credits, a cpu model and ``count`` workers up since ``start``."""
    with session_scope(url) as s:
        rates.sync_settings(s, settings, EARLY)
        account, _ = accounts.create_account(s, "tick", signup_grant=Decimal(100))
        model = Model(account_id=account.id, name="m", hardware="cpu", status=ModelStatus.ACTIVE, max_workers=8)
        s.add(model)
        s.flush()
        ids = []
        for i in range(count):
            # heard from all along: a tick charges no further than a node's last heartbeat
            node = PoolNode(name=f"n{i}@host", host_class="cpu", last_seen=start + timedelta(days=1))
            s.add(node)
            s.flush()
            worker = Worker(
                account_id=account.id,
                model_id=model.id,
                node_name=node.name,
                status=WorkerStatus.UP,
                started_at=start + timedelta(milliseconds=137 * i),
            )
            s.add(worker)
            s.flush()
            ids.append(worker.id)
        return account.id, ids


def test_a_tick_run_twice_charges_once(db_url, settings):
    account, ids = make_tick_world(db_url, settings, count=3)
    now = at(3599.999)
    first = charge_all(lambda: session_scope(db_url), None, settings, now)
    assert first.errors == [] and len(first.charged) == 3
    expected = sum(owed(RUNTIME, T0 + timedelta(milliseconds=137 * i), now) for i in range(3))
    assert first.total == expected
    second = charge_all(lambda: session_scope(db_url), None, settings, now)
    assert second.charged == [] and second.errors == []
    assert check_books(db_url, account) == 100_000_000 - expected


# -- shared execution, through a real Redis --------------------------------------------------


@pytest.fixture
def redis_db():
    redis = pytest.importorskip("redis")
    from tests.conftest import REDIS_TEST_DB

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_TEST_DB)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


MINUTE = bucket_of(datetime(2030, 3, 14, 12, 0, tzinfo=UTC).timestamp())
MINUTE_START = datetime.fromtimestamp(MINUTE * BUCKET_S, UTC)
MINUTE_END = MINUTE_START + timedelta(seconds=BUCKET_S)


def shared_world(url: str, settings) -> tuple[str, str, str, str]:
    with session_scope(url) as s:
        rates.sync_settings(s, settings, EARLY)
        s.add(Rate(scope=rates.profile_scope("cheap"), effective_from=EARLY, execution_per_s=333, source="test"))
        a, _ = accounts.create_account(s, "a", signup_grant=Decimal(10))
        b, _ = accounts.create_account(s, "b", signup_grant=Decimal(10))
        cpu = Model(account_id=a.id, name="cpu-model", hardware="cpu", shared=True)
        gpu = Model(account_id=a.id, name="gpu-model", hardware="gpu", shared=True)
        s.add(cpu)
        s.add(gpu)
        s.flush()
        return a.id, b.id, cpu.id, gpu.id


def test_shared_execution_is_charged_per_account_model_profile_and_minute(db_url, settings, redis_db):
    a, b, cpu, gpu = shared_world(db_url, settings)
    t = MINUTE_START.timestamp()
    # Given queries computed in one minute (and one in the next)
    for account, model, profile, seconds, moment in [
        (a, cpu, "default", 1.2344, t + 1),
        (a, cpu, "default", 0.0006, t + 59.9),  # 1234 + 1 ms, 2 queries
        (a, cpu, "cheap", 1.234, t + 30),  # 333 µcredits/s: 410.922 -> 410
        (a, gpu, "default", 2.5, t + 10),  # 4000 µcredits/s -> 10 000
        (b, cpu, "default", 0.0004, t + 5),  # rounds to 0 ms: a line of 0, one query
        (a, cpu, "default", 9.0, t + 61),  # the next minute
    ]:
        record_execution(redis_db, account, model, profile, seconds, moment)
    factory = lambda: session_scope(db_url)  # noqa: E731
    # When a tick runs while the minute is not over (nor its grace), nothing is charged
    assert charge_all(factory, redis_db, settings, MINUTE_END - timedelta(seconds=1)).charged == []
    assert charge_all(factory, redis_db, settings, MINUTE_END + timedelta(seconds=4)).charged == []
    # When it runs after the minute (and its grace)
    report = charge_all(factory, redis_db, settings, MINUTE_END + timedelta(seconds=6))
    # Then one line per (account, model, profile) of that minute, amount = ms × rate/s // 1000
    got = sorted(
        (line.account_id, line.model_id, line.key, line.quantity_ms, line.queries, -line.amount, line.rate)
        for line in report.charged
    )
    assert got == sorted(
        [
            (a, cpu, f"exec:{a}:{cpu}:default:{MINUTE}", 1235, 2, 1235, 1000),
            (a, cpu, f"exec:{a}:{cpu}:cheap:{MINUTE}", 1234, 1, 410, 333),
            (a, gpu, f"exec:{a}:{gpu}:default:{MINUTE}", 2500, 1, 10_000, 4000),
            (b, cpu, f"exec:{b}:{cpu}:default:{MINUTE}", 0, 1, 0, 1000),
        ]
    )
    assert all(
        line.kind == "execution" and line.period_start == MINUTE_START and line.period_end == MINUTE_END
        for line in report.charged
    )
    assert check_books(db_url, a) == 10_000_000 - 1235 - 410 - 10_000
    assert check_books(db_url, b) == 10_000_000
    # And again: nothing more; the next minute is still pending
    assert charge_all(factory, redis_db, settings, MINUTE_END + timedelta(seconds=30)).charged == []
    assert redis_db.smembers(SHARED_PENDING_KEY) == {f"{a}:{MINUTE + 1}".encode()}
    (later,) = charge_all(factory, redis_db, settings, MINUTE_END + timedelta(seconds=66)).charged
    assert (later.key, -later.amount, later.queries) == (f"exec:{a}:{cpu}:default:{MINUTE + 1}", 9000, 1)
    assert redis_db.smembers(SHARED_PENDING_KEY) == set()
    assert check_books(db_url, a) == 10_000_000 - 1235 - 410 - 10_000 - 9000


def test_a_minute_whose_line_exists_is_not_charged_again(db_url, settings, redis_db):
    # Given a minute charged, whose pending mark survived (a tick that died before forgetting it)
    a, _, cpu, _ = shared_world(db_url, settings)
    record_execution(redis_db, a, cpu, "default", 3.0, MINUTE_START.timestamp() + 1)
    factory = lambda: session_scope(db_url)  # noqa: E731
    now = MINUTE_END + timedelta(seconds=10)
    assert charge_all(factory, redis_db, settings, now).total == 3000
    redis_db.sadd(SHARED_PENDING_KEY, f"{a}:{MINUTE}")
    # When the next tick sees it again
    report = charge_all(factory, redis_db, settings, now)
    # Then the database refuses the second line and the mark is dropped
    assert report.charged == [] and report.errors == []
    assert redis_db.smembers(SHARED_PENDING_KEY) == set()
    assert check_books(db_url, a) == 10_000_000 - 3000


def test_an_execution_price_change_applies_from_its_minute(db_url, settings, redis_db):
    a, _, cpu, _ = shared_world(db_url, settings)
    with session_scope(db_url) as s:  # cpu execution: 0.001 -> 0.002 credits/s from the next minute on
        s.add(
            Rate(
                scope="cpu",
                effective_from=MINUTE_END,
                runtime_per_hour=RUNTIME,
                standby_per_hour=STANDBY,
                execution_per_s=2000,
                source="test",
            )
        )
    record_execution(redis_db, a, cpu, "default", 1.0, MINUTE_START.timestamp() + 59)
    record_execution(redis_db, a, cpu, "default", 1.0, MINUTE_END.timestamp() + 1)
    factory = lambda: session_scope(db_url)  # noqa: E731
    # (a settings-sync at the tick's `now` would add a row back at 0.001: sync it before, as beat did)
    report = charge_all(
        factory,
        redis_db,
        settings.model_copy(update={"execution_rate_per_s": {"cpu": Decimal("0.002"), "gpu": Decimal("0.004")}}),
        MINUTE_END + timedelta(seconds=70),
    )
    assert sorted((line.period_start, -line.amount, line.rate) for line in report.charged) == [
        (MINUTE_START, 1000, 1000),
        (MINUTE_END, 2000, 2000),
    ]


def test_a_stopped_worker_is_left_alone_by_later_ticks(db_url, settings):
    # Given two workers up for an hour (real clock: finish stops "now")
    start = utcnow() - timedelta(hours=1)
    account, (stopped, running) = make_tick_world(db_url, settings, count=2, start=start)
    # When one stops between ticks
    with session_scope(db_url) as s:
        worker_service.finish(s, stopped, WorkerStatus.STOPPED)
        stop = s.get(Worker, stopped).stopped_at
    with session_scope(db_url) as s:
        lines = s.exec(select(LedgerEntry).where(LedgerEntry.worker_id == stopped).order_by(col(LedgerEntry.id))).all()
    assert -sum(line.amount for line in lines) == owed(RUNTIME, start, stop) and lines[-1].period_end == stop
    # Then a later tick charges only the other one
    later = stop + timedelta(minutes=30)
    report = charge_all(lambda: session_scope(db_url), None, settings, later)
    assert {entry.worker_id for entry in report.charged} == {running}
    assert report.total == owed(RUNTIME, start + timedelta(milliseconds=137), later)
    with session_scope(db_url) as s:
        assert len(s.exec(select(LedgerEntry).where(LedgerEntry.worker_id == stopped)).all()) == len(lines)
    assert check_books(db_url, account) == 100_000_000 - owed(RUNTIME, start, stop) - report.total
