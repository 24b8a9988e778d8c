"""Buying credits: the payment-provider interface behind a purchase, and grants.

A provider buys credits with ``credits add``; the platform asks its payment provider
(``CIPHERPOOL_PAYMENT_PROVIDER``, ``module:Class``) to take the payment. The default,
:class:`OfflineInvoice`, records an invoice to be paid offline (by bank transfer, as a
self-hosted operator bills its customers) and credits the account at once. A provider that
needs a card payment implements :class:`PaymentProvider` and answers ``settled=False`` until
its payment clears; nothing is credited before then. An operator grants credits (or refunds,
or adjusts) with database access, no payment involved.

Each purchase carries an idempotency key (the client's, or a fresh one): a retried request
finds its first line and credits nothing twice.
"""

from __future__ import annotations

import importlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlmodel import Session, select

from cipherpool.billing import ledger
from cipherpool.billing.money import show, to_micro
from cipherpool.config.settings import Settings
from cipherpool.db.tables import Invoice, LedgerEntry, utcnow
from cipherpool.errors import ConfigurationError, InvalidInput
from cipherpool.statuses import LedgerKind

CREDIT_KINDS = (LedgerKind.GRANT, LedgerKind.REFUND, LedgerKind.ADJUSTMENT)


@dataclass(frozen=True)
class Payment:
    """What the payment provider made of a purchase: its reference and whether it is paid
    for (or, for an invoice, accepted to be paid), so that the credits are added now."""

    reference: str
    settled: bool
    note: str = ""


class PaymentProvider(Protocol):
    name: str

    def purchase(self, session: Session, account_id: str, amount_micro: int, note: str) -> Payment:
        """Take (or arrange) the payment of ``amount_micro`` micro-credits for the account."""
        ...


class OfflineInvoice:
    """Records an open invoice (``invoices``) and credits the account at once."""

    name = "offline-invoice"

    def purchase(self, session: Session, account_id: str, amount_micro: int, note: str) -> Payment:
        number = f"INV-{utcnow():%Y%m%d}-{secrets.token_hex(6)}"
        session.add(Invoice(id=number, account_id=account_id, amount=amount_micro, provider=self.name, note=note))
        session.flush()
        return Payment(number, settled=True, note=f"invoice {number}, to be paid offline")


def load_provider(path: str) -> PaymentProvider:
    module, _, name = path.partition(":")
    try:
        provider: PaymentProvider = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"payment_provider {path!r} cannot be loaded: {exc}") from None
    return provider


@dataclass(frozen=True)
class Purchase:
    entry: LedgerEntry | None  # None while the payment is not settled
    payment: Payment


def purchase(session: Session, settings: Settings, account_id: str, amount: Decimal | str | int, *,
             idempotency_key: str | None = None, note: str = "") -> Purchase:
    """Buy ``amount`` credits through the payment provider; credited once it is settled."""
    micro = to_micro(amount)
    if micro <= 0:
        raise InvalidInput("A purchase must be of more than 0 credits.")
    if micro > to_micro(settings.credits_max_purchase):
        raise InvalidInput(f"One purchase may be of at most {settings.credits_max_purchase} credits "
                           "(credits_max_purchase).")
    key = f"purchase:{account_id}:{idempotency_key or uuid.uuid4().hex}"
    done = session.exec(select(LedgerEntry).where(LedgerEntry.key == key)).first()
    if done is not None:  # a retried request: the first one's line
        if done.amount != micro:
            raise InvalidInput(f"Idempotency key {idempotency_key!r} was used for a purchase of {show(done.amount)} "
                               "credits; use a new key for another purchase.")
        return Purchase(done, Payment(done.reference or "", True, "already credited"))
    provider = load_provider(settings.payment_provider)
    payment = provider.purchase(session, account_id, micro, note)
    if not payment.settled:
        return Purchase(None, payment)
    entry = ledger.append(session, account_id, LedgerKind.PURCHASE, micro, key, reference=payment.reference,
                          note=note or f"purchase of {show(micro)} credits ({payment.note or provider.name})")
    return Purchase(entry, payment)


def grant(session: Session, account_id: str, amount: Decimal | str | int, *, kind: LedgerKind = LedgerKind.GRANT,
          note: str = "", key: str | None = None) -> LedgerEntry:
    """An operator's line: a grant or refund (positive), or an adjustment (either sign)."""
    kind = LedgerKind(kind)
    if kind not in CREDIT_KINDS:
        raise InvalidInput(f"An operator adds a grant, a refund or an adjustment, not a {kind.value} line.")
    micro = to_micro(amount)
    if micro == 0 or (micro < 0 and kind != LedgerKind.ADJUSTMENT):
        raise InvalidInput(f"A {kind.value} must be of more than 0 credits (an adjustment may be negative).")
    key = f"{kind.value}:{account_id}:{key or uuid.uuid4().hex}"
    entry = ledger.append(session, account_id, kind, micro, key, note=note or f"{kind.value} by the operator")
    if entry is None:
        done = session.exec(select(LedgerEntry).where(LedgerEntry.key == key)).one()
        return done
    return entry
