"""Prices, as a history: what a worker costs per hour (up, or on standby) and what a second
of computation costs on a shared node, per host class and per node profile.

Configuration says what the prices are now (settings per class; a profile in profiles.toml
may set its own). The database keeps every price with the moment it took effect (:class:`Rate`),
added when beat's tick (classes) or a registering node (its profile) sees a change. A period
is priced piece by piece at the rows in force then, so a change applies from its time on and
never to time already charged or still to be charged from before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlmodel import Session, col, select

from cipherpool.billing.money import to_micro
from cipherpool.clock import aware, utcnow
from cipherpool.config.profiles import NodeProfile
from cipherpool.config.settings import Settings, get_settings
from cipherpool.db.tables import Rate

PROFILE_SCOPE = "profile:"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Prices:
    """Micro-credits per hour (runtime, standby) and per second of computation (shared)."""

    runtime_per_hour: int = 0
    standby_per_hour: int = 0
    execution_per_s: int = 0


@dataclass(frozen=True)
class PriceChange:
    """Fields of a price row; None: not set here (a profile's: take the class's)."""

    runtime_per_hour: int | None = None
    standby_per_hour: int | None = None
    execution_per_s: int | None = None

    def empty(self) -> bool:
        return self.runtime_per_hour is None and self.standby_per_hour is None and self.execution_per_s is None


def profile_scope(profile: str) -> str:
    return PROFILE_SCOPE + profile


def class_prices(settings: Settings, host_class: str) -> PriceChange:
    """A class's prices as the settings give them now (0 for a class they do not name)."""
    return PriceChange(
        _micro(settings.rate_per_hour, host_class, "rate_per_hour"),
        _micro(settings.standby_rate_per_hour, host_class, "standby_rate_per_hour"),
        _micro(settings.execution_rate_per_s, host_class, "execution_rate_per_s"),
    )


def profile_prices(profile: NodeProfile) -> PriceChange:
    """The prices a profile sets (None where it leaves its class's)."""

    def micro(value: Decimal | None, what: str) -> int | None:
        return None if value is None else to_micro(value, f"{profile.name}.{what}")

    return PriceChange(
        micro(profile.rate, "rate"), micro(profile.standby_rate, "standby_rate"), micro(profile.execution_rate, "execution_rate")
    )


def _micro(table: Mapping[str, Decimal], host_class: str, what: str) -> int:
    return to_micro(table.get(host_class, Decimal(0)), f"{what}[{host_class}]")


def current(session: Session, scope: str, at: datetime | None = None) -> Rate | None:
    """The row of ``scope`` in force at ``at`` (now)."""
    query = select(Rate).where(Rate.scope == scope)
    if at is not None:
        query = query.where(col(Rate.effective_from) <= at)
    return session.exec(query.order_by(col(Rate.effective_from).desc(), col(Rate.id).desc())).first()


def sync(session: Session, scope: str, prices: PriceChange, source: str, at: datetime | None = None) -> Rate | None:
    """Record ``prices`` for ``scope`` from ``at`` (now) on, if they differ from the row in
    force; a scope with no row and nothing set gets none. Returns the row added, if any."""
    latest = current(session, scope)
    if latest is not None and PriceChange(latest.runtime_per_hour, latest.standby_per_hour, latest.execution_per_s) == prices:
        return None
    if latest is None and prices.empty():
        return None
    when = at or utcnow()
    if latest is not None and aware(latest.effective_from) > when:
        when = aware(latest.effective_from)  # never before a row already there: history only grows
    if latest is None:
        if scope.startswith(PROFILE_SCOPE):
            # Until now the profile had no price of its own: its class's applied, and still
            # applies to that time (a period charged later is priced as it was then).
            session.add(Rate(scope=scope, effective_from=EPOCH, source="no rate of its own before"))
        else:
            when = EPOCH  # a class's first row is what the settings said all along (the fallback before it)
    row = Rate(
        scope=scope,
        effective_from=when,
        runtime_per_hour=prices.runtime_per_hour,
        standby_per_hour=prices.standby_per_hour,
        execution_per_s=prices.execution_per_s,
        source=source,
    )
    session.add(row)
    session.flush()
    return row


def sync_settings(session: Session, settings: Settings, at: datetime | None = None) -> list[Rate]:
    """Bring the class rows in line with the settings (what beat's tick does first)."""
    classes = sorted(set(settings.rate_per_hour) | set(settings.standby_rate_per_hour) | set(settings.execution_rate_per_s))
    added = [sync(session, host_class, class_prices(settings, host_class), "settings", at) for host_class in classes]
    return [row for row in added if row is not None]


def prices_at(session: Session, host_class: str, profile: str | None, at: datetime, settings: Settings | None = None) -> Prices:
    """What a worker (or shared execution) on a node of ``host_class`` and ``profile`` costs at ``at``."""
    base = current(session, host_class, at)
    own = current(session, profile_scope(profile), at) if profile else None

    def pick(field: str) -> int:
        for row in (own, base):
            value = getattr(row, field) if row is not None else None
            if value is not None:
                return int(value)
        fallback = class_prices(settings or get_settings(), host_class)  # no class row yet: the settings now
        return int(getattr(fallback, field) or 0)

    return Prices(pick("runtime_per_hour"), pick("standby_per_hour"), pick("execution_per_s"))


def segments(
    session: Session, host_class: str, profile: str | None, start: datetime, end: datetime, settings: Settings | None = None
) -> list[tuple[datetime, datetime, Prices]]:
    """``[start, end)`` cut where a price of the class or the profile changed, with the prices
    of each piece."""
    scopes = [host_class] + ([profile_scope(profile)] if profile else [])
    changes = sorted(
        {
            aware(t)
            for t in session.exec(
                select(Rate.effective_from).where(
                    col(Rate.scope).in_(scopes), col(Rate.effective_from) > start, col(Rate.effective_from) < end
                )
            )
        }
    )
    cuts = [start, *changes, end]
    return [(a, b, prices_at(session, host_class, profile, a, settings)) for a, b in zip(cuts, cuts[1:]) if b > a]
