"""When a schedule wants its workers: the window open at a moment, the last one that closed,
and the next starts and stops. Pure: no database, no clock (``now`` is always given, in UTC).

A recurring schedule (kind ``cron``) opens a window at a fire time of ``start_cron`` and closes
it at the first fire time of ``stop_cron`` after that; a start that fires while a window is
open opens nothing (the window stays the one that opened first, so a window's start is the
same whenever it is evaluated, which is what makes it a key). A reservation (kind ``once``)
is the one window ``[starts_at, ends_at)``. Windows are half-open: a stop and a start at the
same minute close one window and open the next.

Cron expressions are read on the wall clock of the schedule's time zone, then each wall time
is turned into an instant. Daylight-saving changes, as chosen here:

* a wall time the clocks skip (02:30 on the spring-forward night in Europe/Paris) fires at
  the instant the clocks jump (03:00 CEST), as cronie does for jobs in the skipped hour: the
  day's start is not lost, and a later wall time never maps to an earlier instant (a start
  at 02:30 and a stop at 03:15 give a 15-minute window, not a negative one);
* a wall time the clocks repeat (02:30 on the fall-back night) fires once, at its first
  occurrence (CEST): each wall time fires at most once a day.

Wall times therefore map to instants in the same order, so windows computed on the wall
clock keep their order in UTC; a window whose start and stop both fall in a skipped hour
lasts no time and never opens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo, available_timezones

from croniter import CroniterError, croniter

from cipherpool.errors import InvalidInput
from cipherpool.statuses import ScheduleKind

CRON_FIELDS = 5  # minute hour day-of-month month day-of-week
MAX_CRON_CHARS = 100
SECOND = timedelta(seconds=1)
MAX_STEPS_BACK = 10_000  # fires looked at before now: a repeated hour's worth of every-minute fires is 60


class Definition(Protocol):
    """What a schedule's windows depend on (a ``Schedule`` row is one)."""

    kind: str
    start_cron: str | None
    stop_cron: str | None
    timezone: str
    starts_at: datetime | None
    ends_at: datetime | None


@dataclass(frozen=True)
class Window:
    """``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def holds(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


@dataclass(frozen=True)
class Evaluation:
    """The window open at the moment evaluated (if any), and the latest that had closed by then."""

    open: Window | None
    last_closed: Window | None


@dataclass(frozen=True)
class Transition:
    at: datetime  # UTC
    action: str  # start | stop


# ---- validation ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def check_timezone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; only names of the tz database (no file paths, no ``localtime``)."""
    if not isinstance(name, str) or name not in _zone_names():
        raise InvalidInput(f"Unknown time zone {name!r}: use an IANA name such as Europe/Paris, America/New_York or UTC.")
    return ZoneInfo(name)


def check_cron(expression: str, what: str = "cron expression") -> str:
    """A five-field cron expression (minute hour day-of-month month day-of-week) that fires."""
    text = " ".join(expression.split()) if isinstance(expression, str) else ""
    example = "e.g. '0 8 * * 1-5' (08:00 on weekdays)"
    if not text or len(text) > MAX_CRON_CHARS or len(text.split(" ")) != CRON_FIELDS:
        raise InvalidInput(
            f"Invalid {what} {expression!r}: give five fields, minute hour day-of-month month day-of-week, {example}."
        )
    try:
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as exc:
        raise InvalidInput(f"Invalid {what} {expression!r}: {_reason(exc)}; {example}.") from None
    return text


def _reason(exc: CroniterError) -> str:
    return "it never fires" if "failed to find" in str(exc) else str(exc).replace("[", "").replace("]", "")


def check(definition: Definition) -> None:
    """Refuse a definition whose windows cannot be computed, saying what to change."""
    check_timezone(definition.timezone)
    if definition.kind == ScheduleKind.CRON.value:
        start = check_cron(definition.start_cron or "", "start cron expression")
        stop = check_cron(definition.stop_cron or "", "stop cron expression")
        if start == stop:
            raise InvalidInput(
                "The start and stop cron expressions are the same: a window would close as the next "
                "one opens. Give the stop its own time."
            )
    elif definition.kind == ScheduleKind.ONCE.value:
        if definition.starts_at is None or definition.ends_at is None:
            raise InvalidInput("A reservation needs both starts_at and ends_at.")
        if utc(definition.ends_at) <= utc(definition.starts_at):
            raise InvalidInput("A reservation's ends_at must be after its starts_at.")
    else:
        raise InvalidInput(f"Unknown schedule kind {definition.kind!r}: cron or once.")


# ---- instants and wall times --------------------------------------------------------------


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time (a naive one is taken as UTC, as the database gives it)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant a naive wall time of ``zone`` names: its first occurrence when the clocks
    repeat it, the instant they jumped when they skip it (see the module's docstring)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    return _jump(wall.replace(tzinfo=zone, fold=1).astimezone(UTC), first, zone)


def _jump(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The instant in ``(before, after]`` at which ``zone``'s offset changes (to the second)."""
    offset = after.astimezone(zone).utcoffset()
    while after - before > SECOND:
        middle = before + ((after - before) // 2 // SECOND) * SECOND
        if middle.astimezone(zone).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return after


def _latest_fire(expression: str, zone: ZoneInfo, now: datetime) -> datetime:
    """The latest wall time at which ``expression`` fires whose instant is at or before ``now``.
    In a repeated hour's second pass, wall times up to an hour ahead already happened."""
    local = now.astimezone(zone)
    ahead = max(_offset(local.replace(fold=0)) - _offset(local.replace(fold=1)), timedelta(0))
    fires = croniter(expression, local.replace(tzinfo=None) + ahead + SECOND)
    for _ in range(MAX_STEPS_BACK):  # wall times map to instants in order: the first one at or before now is it
        wall: datetime = fires.get_prev(datetime)
        if to_utc(wall, zone) <= now:
            return wall
    raise InvalidInput(f"The cron expression {expression!r} could not be evaluated in {zone.key} at {now.isoformat()}.")


def _offset(moment: datetime) -> timedelta:
    return moment.utcoffset() or timedelta(0)


# ---- windows ------------------------------------------------------------------------------


def _cron_window(start: str, stop: str, fire: datetime) -> tuple[datetime, datetime]:
    """The wall-clock window that the start fire ``fire`` belongs to: it opened at the first
    start at or after the latest stop at or before ``fire``, and closes at the next stop."""
    closed = croniter(stop, fire + SECOND).get_prev(datetime)
    opened: datetime = croniter(start, closed - SECOND).get_next(datetime)
    return opened, croniter(stop, opened).get_next(datetime)


def _as_window(walls: tuple[datetime, datetime], zone: ZoneInfo) -> Window:
    return Window(to_utc(walls[0], zone), to_utc(walls[1], zone))


def evaluate(definition: Definition, now: datetime) -> Evaluation:
    """The window open at ``now`` and the latest one closed by then (None where there is none)."""
    now = utc(now)
    if definition.kind == ScheduleKind.ONCE.value:
        assert definition.starts_at is not None and definition.ends_at is not None  # checked at creation
        window = Window(utc(definition.starts_at), utc(definition.ends_at))
        return Evaluation(window if window.holds(now) else None, window if window.end <= now else None)
    start, stop, zone = _cron_parts(definition)
    walls = _cron_window(start, stop, _latest_fire(start, zone, now))
    current = _as_window(walls, zone)
    if not current.holds(now):
        return Evaluation(None, current)
    earlier = croniter(start, walls[0]).get_prev(datetime)
    return Evaluation(current, _as_window(_cron_window(start, stop, earlier), zone))


def _cron_parts(definition: Definition) -> tuple[str, str, ZoneInfo]:
    assert definition.start_cron is not None and definition.stop_cron is not None  # checked at creation
    return definition.start_cron, definition.stop_cron, check_timezone(definition.timezone)


def upcoming(definition: Definition, now: datetime, count: int) -> list[Window]:
    """The window open at ``now`` (if any) and the next ones, ``count`` in all (fewer for a
    reservation); windows that last no time (in a skipped hour) are left out."""
    now = utc(now)
    if definition.kind == ScheduleKind.ONCE.value:
        assert definition.starts_at is not None and definition.ends_at is not None
        window = Window(utc(definition.starts_at), utc(definition.ends_at))
        return [window] if window.end > now and count > 0 else []
    start, stop, zone = _cron_parts(definition)
    walls = _cron_window(start, stop, _latest_fire(start, zone, now))
    found: list[Window] = []
    for _ in range(count * 4):  # zero-length windows skipped: a bounded search all the same
        window = _as_window(walls, zone)
        if window.end > now and window.end > window.start:
            found.append(window)
            if len(found) == count:
                break
        opened: datetime = croniter(start, walls[1] - SECOND).get_next(datetime)
        walls = opened, croniter(stop, opened).get_next(datetime)
    return found


def next_transitions(definition: Definition, now: datetime, n: int) -> list[Transition]:
    """The next ``n`` starts and stops after ``now``, in order (for listings)."""
    now = utc(now)
    windows = upcoming(definition, now, n)
    moments = sorted([(w.start, "start") for w in windows] + [(w.end, "stop") for w in windows])
    return [Transition(at, action) for at, action in moments if at > now][:n]
