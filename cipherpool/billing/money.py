"""Amounts of credits: integers of micro-credits (10⁻⁶ credit) inside, ``Decimal`` outside.

Never binary floats: 0.1 + 0.2 credits must be 0.3 credits, and a ledger of a million lines
must sum to its balance to the unit. An amount finer than a micro-credit is refused where a
person types it and carried as a remainder where time produces it (:mod:`.charging`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from cipherpool.errors import InvalidInput

MICRO = 1_000_000  # micro-credits per credit
UNIT = "micro-credit"  # the smallest unit, as the API names it
MS_PER_HOUR = 3_600_000
MS_PER_S = 1000


def to_micro(credits: Decimal | str | int, what: str = "amount") -> int:
    """Credits as an exact integer of micro-credits; InvalidInput if finer or not a number."""
    try:
        value = Decimal(str(credits)) * MICRO
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"The {what} {credits!r} is not a number of credits.") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise InvalidInput(f"The {what} {credits!r} is finer than a micro-credit (at most six decimals).")
    return int(value)


def to_credits(micro: int) -> Decimal:
    """Micro-credits as credits, exactly (six decimals at most, trailing zeros kept to six)."""
    return (Decimal(micro) / MICRO).quantize(Decimal("0.000001"))


def show(micro: int) -> str:
    """For a person: credits without trailing zeros (``12.5``, ``0.000001``, ``-3``)."""
    text = format(to_credits(micro), "f").rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
