"""The ledger: appending a line exactly once, the balance, the history.

A line and the account's cached balance change in one statement pair inside a savepoint:
the ``UPDATE accounts ... RETURNING`` takes the account's row lock (PostgreSQL) or the write
lock (SQLite) first, so lines of one account are numbered one after the other and each
``balance_after`` is right; the ``INSERT`` of a key already there is refused by its unique
index, and rolling the savepoint back undoes the balance too. Callers keep their transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cipherpool.clock import utcnow
from cipherpool.db.tables import Account, LedgerEntry
from cipherpool.errors import AccountNotFound
from cipherpool.statuses import LedgerKind

HISTORY_LIMIT = 10_000


def append(
    session: Session, account_id: str, kind: LedgerKind, amount: int, key: str, *, at: datetime | None = None, **fields: Any
) -> LedgerEntry | None:
    """Add one line (``amount`` signed micro-credits); None if a line with ``key`` exists."""
    lock_account(session, account_id)
    savepoint = session.begin_nested()
    try:
        balance = session.execute(
            update(Account)
            .where(col(Account.id) == account_id)
            .values(balance_micro=col(Account.balance_micro) + amount)
            .returning(col(Account.balance_micro))
        ).scalar_one_or_none()
        if balance is None:
            raise AccountNotFound(f"No account {account_id!r}.")
        entry = LedgerEntry(
            account_id=account_id,
            at=at or utcnow(),
            kind=LedgerKind(kind).value,
            amount=amount,
            balance_after=int(balance),
            key=key,
            **fields,
        )
        session.add(entry)
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        return None
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    account = session.get(Account, account_id)
    if account is not None:  # the identity map's copy: keep it in step with the row
        session.refresh(account, ["balance_micro"])
    return entry


def lock_account(session: Session, account_id: str) -> None:
    """Take the account's row lock (PostgreSQL; SQLite's write lock) for this transaction.

    Also what makes a following savepoint a savepoint: pysqlite opens its transaction only
    before a write, and a SAVEPOINT issued outside one would begin (and its release commit)
    a transaction of its own, so a caller's rollback would not undo the line."""
    session.execute(update(Account).where(col(Account.id) == account_id).values(balance_micro=col(Account.balance_micro)))


def balance(session: Session, account_id: str) -> int:
    """The account's balance: the sum of its ledger (micro-credits)."""
    total = session.exec(select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(LedgerEntry.account_id == account_id)).one()
    return int(total)


def balance_before(session: Session, account_id: str, moment: datetime) -> int:
    """The sum of the lines recorded before ``moment``: a report's opening balance."""
    total = session.exec(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.account_id == account_id, col(LedgerEntry.at) < moment
        )
    ).one()
    return int(total)


def history(
    session: Session,
    account_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: list[LedgerKind] | None = None,
    model_id: str | None = None,
    limit: int | None = HISTORY_LIMIT,
    latest: bool = False,
) -> list[LedgerEntry]:
    """The account's lines recorded in ``[since, until)``, oldest first, filtered: the first
    ``limit`` of them, or with ``latest`` the last ``limit`` (still oldest first)."""
    query = select(LedgerEntry).where(LedgerEntry.account_id == account_id)
    if since is not None:
        query = query.where(col(LedgerEntry.at) >= since)
    if until is not None:
        query = query.where(col(LedgerEntry.at) < until)
    if kinds:
        query = query.where(col(LedgerEntry.kind).in_([LedgerKind(k).value for k in kinds]))
    if model_id is not None:
        query = query.where(LedgerEntry.model_id == model_id)
    if latest and limit is not None:
        return list(reversed(session.exec(query.order_by(col(LedgerEntry.id).desc()).limit(limit)).all()))
    query = query.order_by(col(LedgerEntry.id))
    return list(session.exec(query.limit(limit) if limit is not None else query))
