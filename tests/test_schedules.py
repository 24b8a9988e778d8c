"""Worker schedules: window evaluation as tables (time zones, day boundaries, daylight-saving
changes, missed windows), the service on SQLite and PostgreSQL, and beat's tick with pool
nodes registered in the database and a fake Celery app that records what it was told to send.

Times in the tables are UTC (``Z``); the comment beside each says the wall time it is.
Europe/Paris changes on 2025-03-30 (02:00 CET -> 03:00 CEST) and 2025-10-26 (03:00 CEST ->
02:00 CET); America/New_York on 2025-03-09 (02:00 EST -> 03:00 EDT) and 2025-11-02 (02:00 EDT
-> 01:00 EST).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import select

from cipherpool import errors, lifecycle
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db import session_scope
from cipherpool.db.tables import Account, Model, ModelEvent, ModelStatus, Schedule, ScheduleAction, Worker, WorkerStatus
from cipherpool.fhe.deployment import Versions
from cipherpool.names import BIND_TASK, UNBIND_TASK
from cipherpool.scheduler import schedules, tick, windows
from cipherpool.scheduler.windows import Window
from cipherpool.services import accounts, models, nodes
from cipherpool.services import workers as worker_service
from cipherpool.statuses import EventKind, StopReason


def z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Definition:
    kind: str = "cron"
    start_cron: str | None = None
    stop_cron: str | None = None
    timezone: str = "UTC"
    starts_at: datetime | None = None
    ends_at: datetime | None = None


def cron(start: str, stop: str, tz: str = "UTC") -> Definition:
    return Definition(start_cron=start, stop_cron=stop, timezone=tz)


def once(start: str, end: str) -> Definition:
    return Definition(kind="once", starts_at=z(start), ends_at=z(end))


def win(start: str, end: str) -> Window:
    return Window(z(start), z(end))


PARIS_WEEKDAYS = cron("0 8 * * 1-5", "0 20 * * 1-5", "Europe/Paris")
NY_NIGHTS = cron("0 22 * * 1-5", "0 6 * * 2-6", "America/New_York")  # Monday to Friday nights
FRI_CET, MON_CEST = win("2025-03-28T07:00Z", "2025-03-28T19:00Z"), win("2025-03-31T06:00Z", "2025-03-31T18:00Z")
THU_CET = win("2025-03-27T07:00Z", "2025-03-27T19:00Z")
FRI_NIGHT_EST = win("2025-03-08T03:00Z", "2025-03-08T11:00Z")

# (case, definition, now, the window open then, the latest window closed by then)
EVALUATION = [
    # Europe/Paris, 08:00-20:00 on weekdays, across the spring-forward weekend
    ("paris-before-start", PARIS_WEEKDAYS, "2025-03-28T06:59:59Z", None, THU_CET),  # Fri 07:59:59 CET
    ("paris-at-start", PARIS_WEEKDAYS, "2025-03-28T07:00Z", FRI_CET, THU_CET),  # Fri 08:00 CET
    ("paris-last-second", PARIS_WEEKDAYS, "2025-03-28T18:59:59Z", FRI_CET, THU_CET),
    ("paris-at-stop", PARIS_WEEKDAYS, "2025-03-28T19:00Z", None, FRI_CET),  # a window is half-open
    ("paris-saturday", PARIS_WEEKDAYS, "2025-03-29T12:00Z", None, FRI_CET),
    ("paris-sunday-after-dst", PARIS_WEEKDAYS, "2025-03-30T12:00Z", None, FRI_CET),
    ("paris-monday-cest-before", PARIS_WEEKDAYS, "2025-03-31T05:59Z", None, FRI_CET),  # Mon 07:59 CEST
    ("paris-monday-cest", PARIS_WEEKDAYS, "2025-03-31T06:00Z", MON_CEST, FRI_CET),  # 08:00 CEST is 06:00Z now
    # windows across midnight, America/New_York, across its spring-forward weekend
    ("ny-friday-night", NY_NIGHTS, "2025-03-08T03:00Z", FRI_NIGHT_EST, win("2025-03-07T03:00Z", "2025-03-07T11:00Z")),
    ("ny-after-midnight", NY_NIGHTS, "2025-03-08T10:59Z", FRI_NIGHT_EST, win("2025-03-07T03:00Z", "2025-03-07T11:00Z")),
    ("ny-saturday-morning", NY_NIGHTS, "2025-03-08T11:00Z", None, FRI_NIGHT_EST),  # Sat 06:00 EST
    ("ny-monday-morning", NY_NIGHTS, "2025-03-10T10:00Z", None, FRI_NIGHT_EST),  # no Sunday night window
    (
        "ny-monday-night-edt",
        NY_NIGHTS,
        "2025-03-11T02:00Z",
        win("2025-03-11T02:00Z", "2025-03-11T10:00Z"),
        FRI_NIGHT_EST,
    ),  # Mon 22:00 EDT
    # day and year boundaries in UTC
    (
        "utc-midnight-start",
        cron("0 0 * * *", "0 12 * * *"),
        "2025-01-01T00:00Z",
        win("2025-01-01T00:00Z", "2025-01-01T12:00Z"),
        win("2024-12-31T00:00Z", "2024-12-31T12:00Z"),
    ),
    (
        "utc-last-second-of-year",
        cron("0 0 * * *", "0 12 * * *"),
        "2024-12-31T23:59:59Z",
        None,
        win("2024-12-31T00:00Z", "2024-12-31T12:00Z"),
    ),
    (
        "until-midnight",
        cron("0 18 * * *", "0 0 * * *"),
        "2025-01-01T23:59:59Z",
        win("2025-01-01T18:00Z", "2025-01-02T00:00Z"),
        win("2024-12-31T18:00Z", "2025-01-01T00:00Z"),
    ),
    # Europe/Paris spring forward: 02:00-02:59 do not exist on 2025-03-30
    (
        "spring-start-in-gap-before",
        cron("30 2 * * *", "0 4 * * *", "Europe/Paris"),
        "2025-03-30T00:59Z",
        None,
        win("2025-03-29T01:30Z", "2025-03-29T03:00Z"),
    ),  # 01:59 CET; the day before was 02:30-04:00 CET
    (
        "spring-start-in-gap",
        cron("30 2 * * *", "0 4 * * *", "Europe/Paris"),
        "2025-03-30T01:00Z",
        win("2025-03-30T01:00Z", "2025-03-30T02:00Z"),
        win("2025-03-29T01:30Z", "2025-03-29T03:00Z"),
    ),  # at the jump
    (
        "spring-across-gap",
        cron("0 1 * * *", "0 4 * * *", "Europe/Paris"),
        "2025-03-30T00:30Z",
        win("2025-03-30T00:00Z", "2025-03-30T02:00Z"),
        win("2025-03-29T00:00Z", "2025-03-29T03:00Z"),
    ),  # 2 h, not 3
    (
        "spring-stop-after-jump",
        cron("30 2 * * *", "15 3 * * *", "Europe/Paris"),
        "2025-03-30T01:14Z",
        win("2025-03-30T01:00Z", "2025-03-30T01:15Z"),
        win("2025-03-29T01:30Z", "2025-03-29T02:15Z"),
    ),
    (
        "spring-window-inside-gap",
        cron("10 2 * * *", "40 2 * * *", "Europe/Paris"),
        "2025-03-30T01:00Z",
        None,
        win("2025-03-30T01:00Z", "2025-03-30T01:00Z"),
    ),  # lasts no time: never opens
    # Europe/Paris fall back: 02:00-02:59 happen twice on 2025-10-26; a start there fires once
    (
        "fall-start-first-pass",
        cron("30 2 * * *", "0 5 * * *", "Europe/Paris"),
        "2025-10-26T00:30Z",
        win("2025-10-26T00:30Z", "2025-10-26T04:00Z"),
        win("2025-10-25T00:30Z", "2025-10-25T03:00Z"),
    ),  # 02:30 CEST
    (
        "fall-second-pass-no-restart",
        cron("30 2 * * *", "0 5 * * *", "Europe/Paris"),
        "2025-10-26T01:30Z",
        win("2025-10-26T00:30Z", "2025-10-26T04:00Z"),
        win("2025-10-25T00:30Z", "2025-10-25T03:00Z"),
    ),  # 02:30 CET
    (
        "fall-before-first-pass",
        cron("30 2 * * *", "0 5 * * *", "Europe/Paris"),
        "2025-10-26T00:29Z",
        None,
        win("2025-10-25T00:30Z", "2025-10-25T03:00Z"),
    ),
    (
        "fall-long-night",
        cron("0 1 * * *", "0 4 * * *", "Europe/Paris"),
        "2025-10-26T02:59Z",
        win("2025-10-25T23:00Z", "2025-10-26T03:00Z"),
        win("2025-10-24T23:00Z", "2025-10-25T02:00Z"),
    ),  # 4 h, not 3
    (
        "fall-stop-in-second-pass",
        cron("0 0 * * *", "45 2 * * *", "Europe/Paris"),
        "2025-10-26T01:00Z",
        None,
        win("2025-10-25T22:00Z", "2025-10-26T00:45Z"),
    ),  # 02:00 CET: the 02:45 stop fired in the first pass
    # America/New_York
    (
        "ny-spring-gap",
        cron("30 2 * * *", "30 3 * * *", "America/New_York"),
        "2025-03-09T07:10Z",
        win("2025-03-09T07:00Z", "2025-03-09T07:30Z"),
        win("2025-03-08T07:30Z", "2025-03-08T08:30Z"),
    ),
    (
        "ny-fall-second-pass",
        cron("30 1 * * *", "0 2 * * *", "America/New_York"),
        "2025-11-02T06:30Z",
        win("2025-11-02T05:30Z", "2025-11-02T07:00Z"),
        win("2025-11-01T05:30Z", "2025-11-01T06:00Z"),
    ),  # 01:30 EST
    # a start while a window is open opens nothing: the window keeps its first start
    (
        "second-start-joins",
        cron("0 8,12 * * *", "0 18 * * *"),
        "2025-01-01T13:00Z",
        win("2025-01-01T08:00Z", "2025-01-01T18:00Z"),
        win("2024-12-31T08:00Z", "2024-12-31T18:00Z"),
    ),
    (
        "hourly-start-daily-stop",
        cron("0 * * * *", "0 20 * * *"),
        "2025-01-01T19:30Z",
        win("2024-12-31T20:00Z", "2025-01-01T20:00Z"),
        win("2024-12-30T20:00Z", "2024-12-31T20:00Z"),
    ),
    (
        "stop-and-start-together",
        cron("0 20 * * *", "0 8,20 * * *"),
        "2025-01-01T20:00Z",
        win("2025-01-01T20:00Z", "2025-01-02T08:00Z"),
        win("2024-12-31T20:00Z", "2025-01-01T08:00Z"),
    ),
    # a reservation
    ("reservation-before", once("2025-06-01T08:00Z", "2025-06-01T12:00Z"), "2025-06-01T07:59Z", None, None),
    (
        "reservation-open",
        once("2025-06-01T08:00Z", "2025-06-01T12:00Z"),
        "2025-06-01T08:00Z",
        win("2025-06-01T08:00Z", "2025-06-01T12:00Z"),
        None,
    ),
    (
        "reservation-over",
        once("2025-06-01T08:00Z", "2025-06-01T12:00Z"),
        "2025-06-01T12:00Z",
        None,
        win("2025-06-01T08:00Z", "2025-06-01T12:00Z"),
    ),
    # missed windows: evaluated long after, the latest closed window is the one to stop
    ("missed-a-week", PARIS_WEEKDAYS, "2025-04-06T10:00Z", None, win("2025-04-04T06:00Z", "2025-04-04T18:00Z")),
    (
        "missed-then-open",
        PARIS_WEEKDAYS,
        "2025-04-07T06:30Z",
        win("2025-04-07T06:00Z", "2025-04-07T18:00Z"),
        win("2025-04-04T06:00Z", "2025-04-04T18:00Z"),
    ),
]


@pytest.mark.parametrize(("definition", "now", "open_", "closed"), [c[1:] for c in EVALUATION], ids=[c[0] for c in EVALUATION])
def test_evaluation_table(definition, now, open_, closed):
    evaluation = windows.evaluate(definition, z(now))
    assert (evaluation.open, evaluation.last_closed) == (open_, closed)


# (zone, wall time, the instant it names)
WALL_TIMES = [
    ("Europe/Paris", "2025-01-15T08:00", "2025-01-15T07:00Z"),
    ("Europe/Paris", "2025-07-15T08:00", "2025-07-15T06:00Z"),
    ("Europe/Paris", "2025-03-30T02:00", "2025-03-30T01:00Z"),  # skipped: the jump
    ("Europe/Paris", "2025-03-30T02:59", "2025-03-30T01:00Z"),
    ("Europe/Paris", "2025-03-30T03:00", "2025-03-30T01:00Z"),  # the first wall time after the jump
    ("Europe/Paris", "2025-10-26T02:30", "2025-10-26T00:30Z"),  # repeated: the first (CEST)
    ("Europe/Paris", "2025-10-26T03:00", "2025-10-26T02:00Z"),
    ("America/New_York", "2025-03-09T02:30", "2025-03-09T07:00Z"),
    ("America/New_York", "2025-11-02T01:30", "2025-11-02T05:30Z"),
    ("Australia/Lord_Howe", "2025-10-05T02:15", "2025-10-04T15:30Z"),  # a 30-minute jump
    ("Australia/Lord_Howe", "2025-04-06T01:45", "2025-04-05T14:45Z"),  # a 30-minute repeat
    ("Asia/Kolkata", "2025-03-30T02:30", "2025-03-29T21:00Z"),  # no daylight saving
]


@pytest.mark.parametrize(("zone", "wall", "instant"), WALL_TIMES, ids=[f"{w[0]}-{w[1]}" for w in WALL_TIMES])
def test_wall_times_table(zone, wall, instant):
    assert windows.to_utc(datetime.fromisoformat(wall), ZoneInfo(zone)) == z(instant)


# (case, definition, now, the next transitions)
TRANSITIONS = [
    (
        "paris-friday",
        PARIS_WEEKDAYS,
        "2025-03-28T10:00Z",
        [("2025-03-28T19:00Z", "stop"), ("2025-03-31T06:00Z", "start"), ("2025-03-31T18:00Z", "stop")],
    ),
    (
        "paris-weekend",
        PARIS_WEEKDAYS,
        "2025-03-29T10:00Z",
        [("2025-03-31T06:00Z", "start"), ("2025-03-31T18:00Z", "stop"), ("2025-04-01T06:00Z", "start")],
    ),
    (
        "skips-a-window-in-the-gap",
        cron("10 2 * * *", "40 2 * * *", "Europe/Paris"),
        "2025-03-29T12:00Z",
        [("2025-03-31T00:10Z", "start"), ("2025-03-31T00:40Z", "stop"), ("2025-04-01T00:10Z", "start")],
    ),
    (
        "reservation-ahead",
        once("2025-06-01T08:00Z", "2025-06-01T12:00Z"),
        "2025-05-01T00:00Z",
        [("2025-06-01T08:00Z", "start"), ("2025-06-01T12:00Z", "stop")],
    ),
    ("reservation-open", once("2025-06-01T08:00Z", "2025-06-01T12:00Z"), "2025-06-01T09:00Z", [("2025-06-01T12:00Z", "stop")]),
    ("reservation-over", once("2025-06-01T08:00Z", "2025-06-01T12:00Z"), "2025-06-01T12:00Z", []),
]


@pytest.mark.parametrize(("definition", "now", "expected"), [c[1:] for c in TRANSITIONS], ids=[c[0] for c in TRANSITIONS])
def test_next_transitions_table(definition, now, expected):
    found = windows.next_transitions(definition, z(now), 3)
    assert [(t.at, t.action) for t in found] == [(z(at), action) for at, action in expected]


# (case, definition, what the refusal says)
INVALID = [
    ("four-fields", cron("0 8 * *", "0 20 * * *"), "five fields"),
    ("six-fields", cron("0 0 8 * * *", "0 20 * * *"), "five fields"),
    ("alias", cron("@daily", "0 20 * * *"), "five fields"),
    ("out-of-range", cron("61 8 * * *", "0 20 * * *"), "out of range"),
    ("never-fires", cron("0 8 30 2 *", "0 20 * * *"), "never fires"),
    ("words", cron("a b c d e", "0 20 * * *"), "Invalid start cron"),
    ("hash", cron("0 8 * * *", "H 20 * * *"), "Invalid stop cron"),
    ("empty", cron("", "0 20 * * *"), "five fields"),
    ("same-start-and-stop", cron("0 8 * * *", "0  8 * * *"), "the same"),
    ("unknown-zone", cron("0 8 * * *", "0 20 * * *", "Mars/Olympus"), "Unknown time zone"),
    ("zone-path", cron("0 8 * * *", "0 20 * * *", "../../etc/passwd"), "Unknown time zone"),
    ("zone-case", cron("0 8 * * *", "0 20 * * *", "europe/paris"), "Unknown time zone"),
    ("reservation-backwards", once("2025-06-01T12:00Z", "2025-06-01T08:00Z"), "after its starts_at"),
    ("reservation-empty", once("2025-06-01T12:00Z", "2025-06-01T12:00Z"), "after its starts_at"),
    ("unknown-kind", Definition(kind="weekly"), "Unknown schedule kind"),
]


@pytest.mark.parametrize(("definition", "says"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_definitions_table(definition, says):
    with pytest.raises(errors.InvalidInput, match=says):
        windows.check(definition)


ZONES = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "America/Sao_Paulo"]
PAIRS = [
    ("0 8 * * 1-5", "0 20 * * 1-5"),
    ("30 2 * * *", "15 3 * * *"),
    ("0 22 * * *", "0 6 * * *"),
    ("*/20 * * * *", "10 * * * *"),
    ("0 1 * * 0", "45 2 * * 0"),
    ("0 8,12 * * *", "0 18 * * *"),
]


@settings(max_examples=150, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    pair=st.sampled_from(PAIRS),
    now=st.datetimes(datetime(2024, 1, 1), datetime(2027, 1, 1), timezones=st.just(UTC)),
)
def test_windows_are_consistent_whenever_evaluated(zone, pair, now):
    """A window's start is its key: the same whenever it is evaluated while open; it holds
    ``now``; the last closed window ended by then; the next transitions alternate after now."""
    definition = cron(*pair, tz=zone)
    evaluation = windows.evaluate(definition, now)
    if evaluation.open is not None:
        opened = evaluation.open
        assert opened.start <= now < opened.end
        for moment in (opened.start, opened.end - timedelta(microseconds=1)):
            assert windows.evaluate(definition, moment).open == opened
        assert windows.evaluate(definition, opened.end).last_closed == opened
    closed = evaluation.last_closed
    assert closed is not None and closed.start <= closed.end <= now
    coming = windows.next_transitions(definition, now, 4)
    assert all(t.at > now for t in coming) and [t.at for t in coming] == sorted(t.at for t in coming)
    assert [t.action for t in coming] == (["stop", "start"] * 2 if evaluation.open else ["start", "stop"] * 2)


# ---- the service ----------------------------------------------------------------------------

ARTIFACT = models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1.9.0", "2.10.0", "3.11"))
T0 = z("2025-03-27T20:00Z")  # when the tick tests' schedules are made: Thursday 21:00 CET, after its window


def deploy(session, account, name="m", max_workers=4):
    models.deploy_model(session, account, name, ARTIFACT, max_workers=max_workers)
    return models.set_status(session, account, name, ModelStatus.ACTIVE)


@pytest.fixture
def alice(session):
    account, _ = accounts.create_account(session, "alice")
    deploy(session, account, "m")
    return account


def test_create_a_recurring_schedule_and_describe_it(session, alice):
    made = schedules.create_schedule(
        session,
        alice,
        "m",
        start_cron=" 0 8  * * 1-5",
        stop_cron="0 20 * * 1-5",
        timezone="Europe/Paris",
        workers=2,
        name="office-hours",
        now=T0,
    )
    assert (made.kind, made.start_cron, made.workers, made.name) == ("cron", "0 8 * * 1-5", 2, "office-hours")
    out = schedules.describe(session, made, now=z("2025-03-28T10:00Z"))
    assert (out.model, out.window_start, out.window_end) == ("m", "2025-03-28T07:00:00+00:00", "2025-03-28T19:00:00+00:00")
    assert (out.next_stop, out.next_start) == ("2025-03-28T19:00:00+00:00", "2025-03-31T06:00:00+00:00")
    assert (out.running_workers, out.last_actions, out.paused) == (0, [], False)


def test_a_reservation_is_kept_in_utc(session, alice):
    paris = ZoneInfo("Europe/Paris")
    made = schedules.create_schedule(
        session, alice, "m", starts_at=datetime(2025, 6, 1, 10, tzinfo=paris), ends_at=datetime(2025, 6, 1, 14), workers=1, now=T0
    )  # naive: UTC
    out = schedules.describe(session, made, now=T0)
    assert (out.kind, out.starts_at, out.ends_at) == ("once", "2025-06-01T08:00:00+00:00", "2025-06-01T14:00:00+00:00")
    assert (out.next_start, out.next_stop, out.window_start) == (out.starts_at, out.ends_at, None)


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "workers": 5}, errors.InvalidInput, "max_workers"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "workers": 0}, errors.InvalidInput, "1 to 4"),
        ({"start_cron": "0 8 * * *"}, errors.InvalidInput, "needs start_cron and stop_cron"),
        (
            {"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "starts_at": T0, "ends_at": T0 + timedelta(hours=1)},
            errors.InvalidInput,
            "not both",
        ),
        ({"starts_at": T0 - timedelta(hours=2), "ends_at": T0 - timedelta(hours=1)}, errors.InvalidInput, "past"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "timezone": "Paris"}, errors.InvalidInput, "time zone"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "profile": "GPU!"}, errors.InvalidInput, "profile"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "name": "no spaces"}, errors.InvalidInput, "name"),
        ({"start_cron": "0 8 * * *", "stop_cron": "0 20 * * *", "model": "nope"}, errors.ModelNotFound, "nope"),
    ],
    ids=[
        "above-max-workers",
        "no-workers",
        "half-a-cron",
        "both-kinds",
        "reservation-past",
        "bad-zone",
        "bad-profile",
        "bad-name",
        "unknown-model",
    ],
)
def test_creation_refusals(session, alice, options, error, says):
    options = dict(options)
    with pytest.raises(error, match=says):
        schedules.create_schedule(session, alice, options.pop("model", "m"), now=T0, **options)
    assert session.exec(select(Schedule)).all() == []


def test_another_accounts_schedules_are_not_found(session, alice):
    bob, _ = accounts.create_account(session, "bob")
    deploy(session, bob, "m")
    mine = schedules.create_schedule(session, alice, "m", start_cron="0 8 * * *", stop_cron="0 9 * * *", now=T0)
    for attempt in (
        lambda: schedules.get_schedule(session, bob, mine.id),
        lambda: schedules.set_paused(session, bob, mine.id, True),
        lambda: schedules.delete_schedule(session, bob, mine.id),
    ):
        with pytest.raises(errors.ScheduleNotFound, match=mine.id):
            attempt()
    assert schedules.list_schedules(session, bob) == [] and not mine.paused
    theirs = schedules.create_schedule(session, bob, "m", start_cron="0 8 * * *", stop_cron="0 9 * * *", now=T0)
    assert schedules.get_schedule(session, bob, theirs.id).model_id != mine.model_id  # bob's own "m"
    assert [s.id for s in schedules.list_schedules(session, alice, "m")] == [mine.id]


def test_list_pause_resume_and_delete(session, alice):
    deploy(session, alice, "other")
    first = schedules.create_schedule(session, alice, "m", start_cron="0 8 * * *", stop_cron="0 9 * * *", now=T0)
    second = schedules.create_schedule(
        session, alice, "other", start_cron="0 8 * * *", stop_cron="0 9 * * *", now=T0 + timedelta(seconds=1)
    )
    assert [s.id for s in schedules.list_schedules(session, alice)] == [first.id, second.id]
    assert [s.id for s in schedules.list_schedules(session, alice, "other")] == [second.id]
    paused = schedules.set_paused(session, alice, first.id, True, now=T0 + timedelta(hours=1))
    assert paused.paused and windows.utc(paused.updated_at) == T0 + timedelta(hours=1)
    schedules.set_paused(session, alice, first.id, True, now=T0 + timedelta(hours=2))  # already: unchanged
    assert windows.utc(paused.updated_at) == T0 + timedelta(hours=1)
    out = schedules.describe(session, paused, now=T0)
    assert (out.paused, out.next_start, out.next_stop) == (True, None, None)
    resumed = schedules.set_paused(session, alice, first.id, False, now=T0 + timedelta(hours=3))
    assert not resumed.paused and windows.utc(resumed.updated_at) == T0 + timedelta(hours=3)
    schedules.delete_schedule(session, alice, first.id)
    with pytest.raises(errors.ScheduleNotFound):
        schedules.get_schedule(session, alice, first.id)
    assert [s.id for s in schedules.list_schedules(session, alice)] == [second.id]


def test_an_account_has_a_bounded_number_of_schedules(session, alice, monkeypatch):
    monkeypatch.setattr(schedules, "MAX_SCHEDULES", 2)
    for hour in (1, 2):
        schedules.create_schedule(session, alice, "m", start_cron=f"0 {hour} * * *", stop_cron="0 9 * * *", now=T0)
    with pytest.raises(errors.Conflict, match="remove one"):
        schedules.create_schedule(session, alice, "m", start_cron="0 3 * * *", stop_cron="0 9 * * *", now=T0)


def test_deleting_a_model_deletes_its_schedules_and_their_actions(session, alice):
    made = schedules.create_schedule(session, alice, "m", start_cron="0 8 * * *", stop_cron="0 9 * * *", now=T0)
    session.add(ScheduleAction(schedule_id=made.id, window_start=T0, action="start", status="done"))
    session.flush()
    models.delete_model(session, alice, "m")
    session.flush()
    assert session.exec(select(Schedule)).all() == [] and session.exec(select(ScheduleAction)).all() == []


# ---- beat's tick ----------------------------------------------------------------------------

OFFICE = {"start_cron": "0 8 * * 1-5", "stop_cron": "0 20 * * 1-5", "timezone": "Europe/Paris"}
FRIDAY_0930 = z("2025-03-28T08:30Z")  # Friday 09:30 CET: the window opened at 07:00Z
FRIDAY_WINDOW = z("2025-03-28T07:00Z")
FRIDAY_2100 = z("2025-03-28T20:00Z")  # closed at 19:00Z


@dataclass
class Beat:
    """Beat's context on the test database, a fake Celery app, and alice's model ``m``."""

    ctx: PlatformContext
    app: Any
    sent: list[tuple[str, dict[str, Any]]]
    db: str
    account_id: str

    def tick(self, now: datetime) -> tick.Report:
        return tick.apply_schedules(self.ctx, self.app, now)

    def schedule(self, now: datetime = T0, workers: int = 2, **definition: Any) -> str:
        with session_scope(self.db) as s:
            made = schedules.create_schedule(
                s, s.get(Account, self.account_id), "m", workers=workers, now=now, **(definition or OFFICE)
            )
            return made.id

    def workers(self, schedule_id: str, wanted_only: bool = True) -> list[Worker]:
        with session_scope(self.db) as s:
            rows = s.exec(select(Worker).where(Worker.schedule_id == schedule_id)).all()
            return [w for w in rows if w.status.wanted or not wanted_only]

    def actions(self, schedule_id: str) -> list[tuple[str, str, str, int]]:
        with session_scope(self.db) as s:
            rows = s.exec(
                select(ScheduleAction).where(ScheduleAction.schedule_id == schedule_id).order_by(ScheduleAction.id)
            ).all()
            return [(windows.utc(r.window_start).isoformat(), r.action, r.status, r.attempts) for r in rows]

    def events(self, *kinds: EventKind) -> list[str]:
        with session_scope(self.db) as s:
            rows = s.exec(select(ModelEvent).order_by(ModelEvent.id)).all()
            return [e.kind for e in rows if e.kind in {k.value for k in kinds}]

    def sends(self, task: str) -> int:
        return sum(name == task for name, _ in self.sent)

    def unbind(self) -> None:
        """What the nodes do with the unbind messages: their stopping workers end, freeing them."""
        with session_scope(self.db) as s:
            for worker in s.exec(select(Worker).where(Worker.status == WorkerStatus.STOPPING)).all():
                worker_service.finish(s, worker.id, WorkerStatus.STOPPED)

    def set_paused(self, schedule_id: str, paused: bool, now: datetime) -> None:
        with session_scope(self.db) as s:
            schedules.set_paused(s, s.get(Account, self.account_id), schedule_id, paused, now=now)


@pytest.fixture
def beat(db_url, tmp_path) -> Beat:
    with session_scope(db_url) as s:
        account, _ = accounts.create_account(s, "alice")
        deploy(s, account, "m")
        for name in ("n1", "n2", "n3"):
            nodes.register_node(s, name, nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    sent: list[tuple[str, dict[str, Any]]] = []
    app = SimpleNamespace(send_task=lambda name, kwargs=None, queue=None, **_: sent.append((name, kwargs or {})))
    # The worker log's Redis is unreachable here: its lines are best effort, the decisions are not.
    ctx = PlatformContext(Settings(data_dir=tmp_path, database_url=db_url, broker_url="redis://127.0.0.1:1/0"))
    return Beat(ctx, app, sent, db_url, account.id)


def test_a_window_starts_its_workers_once_and_stops_them_when_it_closes(beat):
    sid = beat.schedule()
    assert beat.tick(z("2025-03-28T06:59Z")).as_dict()["started"] == []  # Friday 07:59 CET: not yet
    assert beat.tick(FRIDAY_0930).started == [sid]
    assert len(beat.workers(sid)) == 2 and beat.sends(BIND_TASK) == 2
    assert all(w.started_by == "schedule" for w in beat.workers(sid))
    assert beat.tick(FRIDAY_0930 + timedelta(minutes=1)).started == []  # done: not twice
    assert beat.sends(BIND_TASK) == 2
    assert beat.tick(FRIDAY_2100).stopped == [sid]
    assert beat.workers(sid) == [] and beat.sends(UNBIND_TASK) == 2
    assert {w.stop_reason for w in beat.workers(sid, wanted_only=False)} == {StopReason.SCHEDULE.value}
    assert beat.tick(FRIDAY_2100 + timedelta(minutes=1)).as_dict() == tick.Report().as_dict()
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "done", 1), (FRIDAY_WINDOW.isoformat(), "stop", "done", 1)]
    assert beat.events(EventKind.SCHEDULE_STARTED, EventKind.SCHEDULE_STOPPED) == ["schedule_started", "schedule_stopped"]


def test_two_beats_that_both_see_a_start_due_apply_it_once(beat):
    sid = beat.schedule()
    with session_scope(beat.db) as first, session_scope(beat.db) as second:
        due_a, due_b = tick.due_actions(first, FRIDAY_0930), tick.due_actions(second, FRIDAY_0930)
    assert [d.action for d in due_a] == [d.action for d in due_b] == ["start"]
    tick.apply_due(beat.ctx, beat.app, due_a[0], FRIDAY_0930, tick.Report())
    tick.apply_due(beat.ctx, beat.app, due_b[0], FRIDAY_0930, tick.Report())  # its claim is refused
    assert len(beat.workers(sid)) == 2 and beat.sends(BIND_TASK) == 2
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "done", 1)]


def test_two_beats_ticking_at_once_start_the_window_once(beat):
    sid = beat.schedule()
    barrier = threading.Barrier(2)
    reports: list[tick.Report] = []

    def run() -> None:
        barrier.wait()
        reports.append(beat.tick(FRIDAY_0930))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(len(r.started) for r in reports) == [0, 1] and all(r.errors == 0 for r in reports)
    assert len(beat.workers(sid)) == 2 and beat.sends(BIND_TASK) == 2


def test_a_refused_start_is_retried_while_the_window_is_open(beat):
    sid = beat.schedule(workers=4)  # 3 nodes: refused, all or none
    assert beat.tick(FRIDAY_0930).failed == [sid]
    assert beat.tick(FRIDAY_0930 + timedelta(minutes=1)).failed == [sid]  # retried, same reason
    assert beat.workers(sid) == [] and beat.sends(BIND_TASK) == 0
    assert beat.events(EventKind.SCHEDULE_FAILED) == ["schedule_failed"]  # one event per reason, not per tick
    with session_scope(beat.db) as s:
        (row,) = s.exec(select(ScheduleAction)).all()
        assert "no_free_node" not in row.message and "4 worker(s)" in row.message and "free" in row.message
        nodes.register_node(s, "n4", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=1))
    assert beat.tick(FRIDAY_0930 + timedelta(minutes=2)).started == [sid]
    assert len(beat.workers(sid)) == 4
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "done", 3)]


def test_a_failed_action_is_taken_over_by_one_beat_only(beat):
    sid = beat.schedule(workers=4)
    beat.tick(FRIDAY_0930)
    with session_scope(beat.db) as s:
        seen = s.exec(select(ScheduleAction)).one()
    assert seen.status == "failed"
    assert tick.take_over(beat.ctx, seen, FRIDAY_0930) is True
    assert tick.take_over(beat.ctx, seen, FRIDAY_0930) is False  # the same view: the compare-and-set fails
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "claimed", 2)]


def test_a_claim_left_by_a_dead_beat_is_taken_over_once_stale(beat):
    sid = beat.schedule()
    with session_scope(beat.db) as s:
        s.add(
            ScheduleAction(
                schedule_id=sid,
                window_start=FRIDAY_WINDOW,
                action="start",
                status="claimed",
                at=FRIDAY_0930 - timedelta(seconds=60),
            )
        )
    assert beat.tick(FRIDAY_0930).started == []  # a fresh claim: another beat is at it
    later = FRIDAY_0930 + timedelta(seconds=tick.STALE_CLAIM_S)
    assert beat.tick(later).started == [sid]
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "done", 2)]


def test_a_start_missed_while_beat_was_down_is_applied_if_the_window_is_still_open(beat):
    sid = beat.schedule()
    assert beat.tick(z("2025-03-28T16:00Z")).started == [sid]  # first tick since Thursday: Friday 17:00 CET
    assert beat.actions(sid) == [(FRIDAY_WINDOW.isoformat(), "start", "done", 1)]  # keyed by the window's start


def test_a_window_missed_entirely_is_recorded_skipped_and_starts_nothing(beat):
    sid = beat.schedule()
    report = beat.tick(z("2025-03-29T10:00Z"))  # Saturday: Friday's window opened and closed unseen
    assert (report.skipped, report.started, report.stopped) == ([sid], [], [])
    assert beat.actions(sid) == [
        (FRIDAY_WINDOW.isoformat(), "start", "skipped", 1),
        (FRIDAY_WINDOW.isoformat(), "stop", "done", 1),
    ]
    assert beat.sends(BIND_TASK) == 0
    assert beat.tick(z("2025-03-29T11:00Z")).skipped == []  # recorded once


def test_workers_carry_over_when_a_stop_is_missed_and_the_next_window_is_open(beat):
    sid = beat.schedule()
    beat.tick(FRIDAY_0930)
    friday = {w.id for w in beat.workers(sid)}
    monday_window = z("2025-03-31T06:00Z")
    assert beat.tick(monday_window + timedelta(hours=1)).stopped == []  # down all weekend: Monday's window is open
    assert {w.id for w in beat.workers(sid)} == friday and beat.sends(BIND_TASK) == 2
    assert beat.actions(sid)[-1] == (monday_window.isoformat(), "start", "done", 1)


def test_a_schedule_made_during_a_window_starts_at_once_and_ignores_windows_before_it(beat):
    made = FRIDAY_0930 - timedelta(minutes=5)
    sid = beat.schedule(now=made)
    assert beat.tick(FRIDAY_0930).started == [sid]
    assert beat.actions(sid) == [(made.isoformat(), "start", "done", 1)]  # from when it was made
    late = beat.schedule(now=z("2025-03-28T18:30Z"), workers=1)  # Friday 19:30 CET, its window closing at 20:00
    beat.tick(FRIDAY_2100)  # no tick saw it open: its start is recorded skipped, then its stop
    assert [a[1:3] for a in beat.actions(late)] == [("start", "skipped"), ("stop", "done")]
    unborn = beat.schedule(now=FRIDAY_2100, workers=1)
    beat.tick(FRIDAY_2100 + timedelta(minutes=1))
    assert beat.actions(unborn) == []  # Friday's window closed before it was made


def test_a_paused_schedule_stops_its_workers_and_a_resume_in_the_window_starts_them(beat):
    sid = beat.schedule()
    beat.tick(FRIDAY_0930)
    paused_at = FRIDAY_0930 + timedelta(hours=1)
    beat.set_paused(sid, True, paused_at)
    assert beat.tick(paused_at + timedelta(minutes=1)).stopped == [sid]
    assert beat.workers(sid) == [] and beat.sends(UNBIND_TASK) == 2
    assert beat.tick(paused_at + timedelta(minutes=2)).as_dict() == tick.Report().as_dict()  # paused: nothing
    beat.unbind()
    resumed_at = paused_at + timedelta(hours=1)
    beat.set_paused(sid, False, resumed_at)
    assert beat.tick(resumed_at + timedelta(minutes=1)).started == [sid]
    assert len(beat.workers(sid)) == 2
    assert [a[:2] for a in beat.actions(sid)] == [
        (FRIDAY_WINDOW.isoformat(), "start"),
        (paused_at.isoformat(), "stop"),
        (resumed_at.isoformat(), "start"),
    ]


def test_removing_a_schedule_stops_its_workers_at_once(beat):
    sid = beat.schedule()
    beat.tick(FRIDAY_0930)
    user_started = lifecycle.start_worker(beat.ctx, beat.app, beat.account_id, "m")  # not the schedule's
    stopped = tick.remove_schedule(beat.ctx, beat.app, beat.account_id, sid)
    assert len(stopped) == 2 and beat.workers(sid) == [] and beat.sends(UNBIND_TASK) == 2
    with session_scope(beat.db) as s:
        assert s.get(Schedule, sid) is None and s.exec(select(ScheduleAction)).all() == []
        assert s.get(Worker, user_started.id).status == WorkerStatus.PENDING
    assert beat.tick(FRIDAY_0930 + timedelta(minutes=1)).as_dict() == tick.Report().as_dict()
    with pytest.raises(errors.ScheduleNotFound):
        tick.remove_schedule(beat.ctx, beat.app, beat.account_id, sid)


def test_workers_started_as_their_schedule_is_paused_are_stopped_again(beat, monkeypatch):
    """The pause commits while the beat is starting workers: its tick could not see them, so
    the beat that started them stops them."""
    sid = beat.schedule()
    real_start = lifecycle.start_workers

    def start_then_pause(*args: Any, **kwargs: Any) -> list[Worker]:
        started = real_start(*args, **kwargs)
        beat.set_paused(sid, True, FRIDAY_0930)
        return started

    monkeypatch.setattr(lifecycle, "start_workers", start_then_pause)
    assert beat.tick(FRIDAY_0930).started == [sid]
    assert beat.workers(sid) == [] and beat.sends(UNBIND_TASK) == 2


def test_workers_started_as_their_window_closes_are_stopped_again(beat, monkeypatch):
    """A start decided just before the window's end, applied after it (and after another beat
    closed the window, finding nothing to stop): the beat that started them stops them."""
    sid = beat.schedule()
    window_end = FRIDAY_2100.replace(hour=19, minute=0)  # 20:00 Paris
    real_start, clock = lifecycle.start_workers, [0.0]
    monkeypatch.setattr(tick.time, "monotonic", lambda: clock[0])

    def slow_start(*args: Any, **kwargs: Any) -> list[Worker]:
        clock[0] += 5.0  # the start took five seconds: the window closed meanwhile
        return real_start(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "start_workers", slow_start)
    assert beat.tick(window_end - timedelta(seconds=2)).started == [sid]
    assert beat.workers(sid) == [] and beat.sends(UNBIND_TASK) == 2


def test_a_start_tops_the_schedule_up_and_an_inactive_model_is_a_failure(beat):
    sid = beat.schedule(workers=3)
    with session_scope(beat.db) as s:
        account = s.get(Account, beat.account_id)
        worker_service.start_workers(s, account, "m", 10, started_by="schedule", schedule_id=sid)
    beat.tick(FRIDAY_0930)
    assert len(beat.workers(sid)) == 3 and beat.sends(BIND_TASK) == 2  # two more, not three
    with session_scope(beat.db) as s:
        models.set_status(s, s.get(Account, beat.account_id), "m", ModelStatus.INACTIVE)
    beat.tick(FRIDAY_2100)
    monday = z("2025-03-31T07:00Z")
    assert beat.tick(monday).failed == [sid]
    with session_scope(beat.db) as s:
        row = s.exec(select(ScheduleAction).where(ScheduleAction.status == "failed")).one()
        assert "activate it" in row.message
        assert s.exec(select(Model)).one().status == ModelStatus.INACTIVE


def test_the_beat_task_applies_the_schedules_and_reports_what_it_did(beat, monkeypatch):
    """The control task as beat's entry runs it (eagerly here), at the clock's time."""
    from cipherpool.config.settings import reset_settings

    monkeypatch.setenv("CIPHERPOOL_BROKER_URL", "redis://127.0.0.1:1/0")  # what the task module's app reads
    reset_settings()
    try:
        from cipherpool.tasks import control
    finally:
        monkeypatch.delenv("CIPHERPOOL_BROKER_URL")
        reset_settings()
    monkeypatch.setattr(control, "platform", lambda: beat.ctx)
    monkeypatch.setattr(control, "app", beat.app)  # what the task sends with: the fake
    now = datetime.now(UTC)
    sid = beat.schedule(
        now=now - timedelta(minutes=2), workers=1, starts_at=now - timedelta(minutes=1), ends_at=now + timedelta(hours=1)
    )
    result = control.schedules.apply().get()
    assert result == {"ok": True, "value": {"started": [sid], "stopped": [], "failed": [], "skipped": [], "errors": 0}}
    assert len(beat.workers(sid)) == 1 and beat.sends(BIND_TASK) == 1
