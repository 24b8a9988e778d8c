"""Durations and moments as the CLI takes them: ``30d``, ``12h``, ``90m``, ``3600s``, ``1h30m``
(a unit is required: a bare ``30`` is refused, not taken as seconds); ISO 8601 times (UTC
unless they carry an offset)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import click

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
UNITS_TEXT = "s, m, h, d or w, like 30s, 10m, 2h, 7d or 1h30m"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: number-unit parts (s, m, h, d, w). A bare number is refused (is
    ``30`` seconds or days?). Raises ValueError for anything else, or for a duration that is
    not positive."""
    spec = text.strip().lower()
    if _is_number(spec):
        raise ValueError(f"{text!r} has no unit: give one of {UNITS_TEXT}")
    parts = _PART.findall(spec)
    if not parts or "".join(n + u for n, u in parts) != spec:
        raise ValueError(f"{text!r} is not a duration: a number with a unit ({UNITS_TEXT})")
    seconds = sum(float(n) * UNITS_S[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def _is_number(spec: str) -> bool:
    try:
        float(spec)
    except ValueError:
        return False
    return True


def parse_moment(text: str) -> datetime:
    """An ISO 8601 time, made timezone-aware (UTC unless it carries an offset)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (like 2030-01-31 or 2030-01-31T12:00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Duration(click.ParamType[float, Any]):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Moment(click.ParamType[datetime, Any]):
    name = "iso-time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
MOMENT = Moment()
