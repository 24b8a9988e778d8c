"""Time as the platform stores it: timezone-aware UTC.

At the bottom floor because every layer needs it (the database's defaults, billing's
periods, tokens' expiries): a helper that lived in a service made billing import services.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back naive (they are UTC); clients may send naive ones too."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
