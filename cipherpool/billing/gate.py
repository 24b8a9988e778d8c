"""The balance as a gate: enough credit to start workers.

A start needs ``credits_min_start_minutes`` of the new workers' rate in the balance (ten
minutes by default), so a worker never starts only to be stopped at the next tick; the
refusal says how much is missing.
"""

from __future__ import annotations

from sqlmodel import Session

from cipherpool.billing.money import MS_PER_HOUR, show
from cipherpool.billing.rates import prices_at
from cipherpool.clock import utcnow
from cipherpool.config.settings import Settings
from cipherpool.db.tables import Account, Model, PoolNode
from cipherpool.errors import InsufficientCredits


def start_cost(session: Session, nodes: list[PoolNode], minutes: float, standby: bool, settings: Settings | None = None) -> int:
    """Micro-credits that ``minutes`` of workers on ``nodes`` cost at today's rates (rounded up)."""
    now, ms, total = utcnow(), round(minutes * 60_000), 0
    for node in nodes:
        prices = prices_at(session, node.host_class, node.profile, now, settings)
        rate = prices.standby_per_hour if standby else prices.runtime_per_hour
        total += -(-rate * ms // MS_PER_HOUR)
    return total


def require_start_credit(
    session: Session,
    account: Account,
    model: Model,
    nodes: list[PoolNode],
    minutes: float,
    standby: bool = False,
    settings: Settings | None = None,
) -> None:
    """InsufficientCredits, saying how much is missing, unless the balance covers ``minutes``
    of the workers about to start on ``nodes``."""
    if not nodes:
        return
    needed = max(start_cost(session, nodes, minutes, standby, settings), 1) if minutes > 0 else 1
    if account.balance_micro >= needed:  # and never at zero: it would be stopped at the next tick
        return
    missing = needed - account.balance_micro
    raise InsufficientCredits(
        f"Starting {len(nodes)} worker(s) of model {model.name!r} needs {show(needed)} credits in the balance "
        f"({minutes:g} minutes at their rate); the balance is {show(account.balance_micro)}: {show(missing)} credits "
        f"missing. Add credits (`cipherpool credits add {show(missing)}`)."
    )
