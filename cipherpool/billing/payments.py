"""Buying credits: the payment-provider interface behind a purchase, and grants.

A provider buys credits with ``credits add``; the platform records the purchase as an
invoice and asks its payment provider (``CIPHERPOOL_PAYMENT_PROVIDER``, ``module:Class``) to
take the payment. The default, :class:`OfflineInvoice`, leaves the invoice open, to be paid
offline (by bank transfer, as a self-hosted operator bills its customers), and credits the
account at once. A provider that takes card payments implements :class:`PaymentProvider` and
answers ``settled=False`` until its payment clears; nothing is credited before then, and
:func:`settle_invoice` (its callback, or ``cipherpool admin credits settle``) credits it
once. An operator grants credits (or refunds, or adjusts) with database access, no payment
involved.

Each purchase carries an idempotency key (the client's, or a fresh one): a retried request
finds its first line and credits nothing twice.
"""

from __future__ import annotations

import importlib
import secrets
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from cipherpool.billing import ledger
from cipherpool.billing.money import show, to_micro
from cipherpool.clock import utcnow
from cipherpool.config.settings import Settings
from cipherpool.db.tables import Invoice, LedgerEntry
from cipherpool.errors import ConfigurationError, InvalidInput, NotFound
from cipherpool.statuses import LedgerKind

CREDIT_KINDS = (LedgerKind.GRANT, LedgerKind.REFUND, LedgerKind.ADJUSTMENT)


@dataclass(frozen=True)
class Payment:
    """What the payment provider made of a purchase: its reference, whether it is paid for
    (or, for an invoice, accepted to be paid) so that the credits are added now, and the
    invoice status to record (``open``: to be paid offline; ``paid``; ``pending``)."""

    reference: str
    settled: bool
    note: str = ""
    status: str | None = None


class PaymentProvider(Protocol):
    name: str

    def purchase(self, session: Session, account_id: str, amount_micro: int, note: str) -> Payment:
        """Take (or arrange) the payment of ``amount_micro`` micro-credits for the account."""
        ...


class OfflineInvoice:
    """The invoice is the payment: open, to be paid offline; the account is credited at once."""

    name = "offline-invoice"

    def purchase(self, session: Session, account_id: str, amount_micro: int, note: str) -> Payment:
        return Payment("", settled=True, note="invoice to be paid offline", status="open")


def load_provider(path: str) -> PaymentProvider:
    module, _, name = path.partition(":")
    try:
        provider: PaymentProvider = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"payment_provider {path!r} cannot be loaded: {exc}") from None
    return provider


@dataclass(frozen=True)
class Purchase:
    invoice: Invoice
    entry: LedgerEntry | None  # None while the payment is not settled
    note: str = ""

    @property
    def reference(self) -> str:
        return self.invoice.reference or self.invoice.id


def purchase(
    sessions: Callable[[], AbstractContextManager[Session]],
    settings: Settings,
    account_id: str,
    amount: Decimal | str | int,
    *,
    idempotency_key: str | None = None,
    note: str = "",
) -> Purchase:
    """Buy ``amount`` credits through the payment provider; credited once it is settled.

    Three steps, each committed: the purchase is recorded (an invoice, ``pending``, under its
    idempotency key); the provider is asked, outside any transaction (no lock is held through
    its network call); the answer is recorded and, if settled, credited. A retry with the same
    key finds the invoice and takes no second payment, even if the first request died between
    the payment and its credit (that invoice is credited by :func:`settle_invoice`)."""
    micro = to_micro(amount)
    if micro <= 0:
        raise InvalidInput("A purchase must be of more than 0 credits.")
    if micro > to_micro(settings.credits_max_purchase):
        raise InvalidInput(f"One purchase may be of at most {settings.credits_max_purchase} credits (credits_max_purchase).")
    key = f"purchase:{account_id}:{idempotency_key or uuid.uuid4().hex}"
    provider = load_provider(settings.payment_provider)
    number = f"INV-{utcnow():%Y%m%d}-{secrets.token_hex(6)}"
    with sessions() as session:
        ledger.lock_account(session, account_id)  # opens the transaction: the savepoint below is one
        savepoint = session.begin_nested()
        try:
            session.add(Invoice(id=number, account_id=account_id, key=key, amount=micro, provider=provider.name, note=note))
            session.flush()
        except IntegrityError:  # this key's purchase exists (a retry, or the same request twice at once)
            savepoint.rollback()
            return _again(session, key, micro, idempotency_key)
        savepoint.commit()
    with sessions() as session:
        payment = provider.purchase(session, account_id, micro, note)
    with sessions() as session:
        invoice = session.get(Invoice, number)
        assert invoice is not None  # committed above
        invoice.reference = payment.reference or None
        invoice.status = payment.status or ("paid" if payment.settled else "pending")
        session.add(invoice)
        entry = credit_invoice(session, invoice, payment.note or provider.name) if payment.settled else None
        return Purchase(invoice, entry, payment.note)


def _again(session: Session, key: str, micro: int, idempotency_key: str | None) -> Purchase:
    invoice = session.exec(select(Invoice).where(Invoice.key == key)).one()
    if invoice.amount != micro:
        raise InvalidInput(
            f"Idempotency key {idempotency_key!r} was used for a purchase of {show(invoice.amount)} "
            "credits; use a new key for another purchase."
        )
    entry = session.exec(select(LedgerEntry).where(LedgerEntry.key == key)).first()
    return Purchase(
        invoice,
        entry,
        "already credited"
        if entry is not None
        else "already recorded under this idempotency key; credited once its payment clears",
    )


def credit_invoice(session: Session, invoice: Invoice, how: str = "") -> LedgerEntry:
    """Add the invoice's credits to the ledger, once (keyed by the invoice's purchase key)."""
    entry = ledger.append(
        session,
        invoice.account_id,
        LedgerKind.PURCHASE,
        invoice.amount,
        invoice.key,
        reference=invoice.id,
        note=invoice.note or f"purchase of {show(invoice.amount)} credits, {invoice.id}{' (' + how + ')' if how else ''}",
    )
    if entry is None:
        entry = session.exec(select(LedgerEntry).where(LedgerEntry.key == invoice.key)).one()
    invoice.credited = True
    session.add(invoice)
    return entry


def settle_invoice(session: Session, invoice_id: str, status: str = "paid") -> LedgerEntry:
    """A payment that cleared (a provider's callback, an operator's word): credit it, once,
    and record its status (``paid``; ``open`` for an invoice accepted to be paid later)."""
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise NotFound(f"No invoice {invoice_id!r}.")
    if status not in ("paid", "open"):
        raise InvalidInput("An invoice is settled as paid or open.")
    invoice.status = status
    return credit_invoice(session, invoice, f"settled: {status}")


def grant(
    session: Session,
    account_id: str,
    amount: Decimal | str | int,
    *,
    kind: LedgerKind = LedgerKind.GRANT,
    note: str = "",
    key: str | None = None,
) -> LedgerEntry:
    """An operator's line: a grant or refund (positive), or an adjustment (either sign)."""
    kind = LedgerKind(kind)
    if kind not in CREDIT_KINDS:
        raise InvalidInput(f"An operator adds a grant, a refund or an adjustment, not a {kind.value} line.")
    micro = to_micro(amount)
    if micro == 0 or (micro < 0 and kind != LedgerKind.ADJUSTMENT):
        raise InvalidInput(f"A {kind.value} must be of more than 0 credits (an adjustment may be negative).")
    given = key
    key = f"{kind.value}:{account_id}:{key or uuid.uuid4().hex}"
    entry = ledger.append(session, account_id, kind, micro, key, note=note or f"{kind.value} by the operator")
    if entry is None:  # a retry: the first line, if it is the same
        done = session.exec(select(LedgerEntry).where(LedgerEntry.key == key)).one()
        if done.amount != micro:
            raise InvalidInput(
                f"Key {given!r} was used for a {kind.value} of {show(done.amount)} credits; nothing "
                "was added. Use a new key for another one."
            )
        return done
    return entry
