"""Credits: the ledger, rates and invoices; balances on accounts, billing marks on workers.

Revision ID: 0004_credits
Revises: 0003_pool
Create Date: 2026-11-22

* ``ledger``: an account's credit lines (append-only), each with a unique ``key`` so that a
  charge can be made only once; ``rates``: prices per class or profile from a moment on;
  ``invoices``: what the payment provider recorded for purchases;
* ``accounts.balance_micro`` (the ledger's sum, kept with each line) and ``low_balance_at``;
  ``workers.billed_to`` and ``billed_remainder`` (charged up to, and the fraction carried).

Data: billing starts at the upgrade. Each existing account gets an opening grant of
``CIPHERPOOL_CREDITS_SIGNUP_GRANT`` credits (100 by default), what a new account gets, so
that workers running at the upgrade are not stopped by the first tick; those workers are
charged from the upgrade on, not from when they started, and workers that ended before it owe
nothing. The downgrade drops it all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0004_credits"
down_revision: str | Sequence[str] | None = "0003_pool"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLDING_NODE = ("pending", "loading", "up", "standby", "stopping")  # 0003's statuses that hold a node


def _str(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sqlmodel.sql.sqltypes.AutoString(), nullable=nullable)


def _time(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _big(name: str, nullable: bool = True) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "rates",
        sa.Column("id", sa.Integer(), nullable=False),
        _str("scope"),
        _time("effective_from"),
        _big("runtime_per_hour"),
        _big("standby_per_hour"),
        _big("execution_per_s"),
        _str("source"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rates") as batch:
        batch.create_index(batch.f("ix_rates_effective_from"), ["effective_from"], unique=False)
        batch.create_index(batch.f("ix_rates_scope"), ["scope"], unique=False)
    op.create_table(
        "invoices",
        _str("id"),
        _str("account_id"),
        _str("key"),
        _big("amount", nullable=False),
        _str("status"),
        sa.Column("credited", sa.Boolean(), nullable=False),
        _str("provider"),
        _str("reference", True),
        _time("created_at"),
        _str("note"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("invoices") as batch:
        batch.create_index(batch.f("ix_invoices_account_id"), ["account_id"], unique=False)
    op.create_table(
        "ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        _str("account_id"),
        _time("at"),
        _str("kind"),
        _big("amount", nullable=False),
        _big("balance_after", nullable=False),
        _str("key"),
        _str("model_id", True),
        _str("worker_id", True),
        _str("node", True),
        _time("period_start", True),
        _time("period_end", True),
        _big("quantity_ms"),
        sa.Column("queries", sa.Integer(), nullable=True),
        _big("rate"),
        _str("reference", True),
        _str("note"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("ledger") as batch:
        for column in ("account_id", "at", "kind", "model_id", "period_start", "worker_id"):
            batch.create_index(batch.f(f"ix_ledger_{column}"), [column], unique=False)
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("balance_micro", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(_time("low_balance_at", True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(_time("billed_to", True))
        batch.add_column(sa.Column("billed_remainder", sa.BigInteger(), nullable=False, server_default="0"))
    _open_accounts()


def _open_accounts() -> None:
    """The opening grant of each account, and billing of running workers from now on."""
    grant = _opening_grant()
    now = datetime.now(UTC)
    bind = op.get_bind()
    accounts = sa.table("accounts", sa.column("id", sa.String()), sa.column("balance_micro", sa.BigInteger()))
    ledger = sa.table(
        "ledger",
        sa.column("at", sa.DateTime(timezone=True)),
        *(sa.column(c) for c in ("account_id", "kind", "amount", "balance_after", "key", "note")),
    )
    moment = sa.DateTime(timezone=True)
    workers = sa.table(
        "workers",
        sa.column("status", sa.String()),
        sa.column("started_at", moment),
        sa.column("stopped_at", moment),
        sa.column("billed_to", moment),
    )
    if grant > 0:
        for (account_id,) in bind.execute(sa.select(accounts.c.id)).all():
            bind.execute(
                sa.insert(ledger).values(
                    account_id=account_id,
                    at=now,
                    kind="grant",
                    amount=grant,
                    balance_after=grant,
                    key=f"grant:{account_id}:opening",
                    note="opening grant (credits start with this version)",
                )
            )
            bind.execute(sa.update(accounts).where(accounts.c.id == account_id).values(balance_micro=grant))
    bind.execute(
        sa.update(workers).where(workers.c.status.in_(HOLDING_NODE), workers.c.started_at.is_not(None)).values(billed_to=now)
    )
    # Workers that ended before credits existed owe nothing: settled up to their stop.
    bind.execute(
        sa.update(workers)
        .where(workers.c.stopped_at.is_not(None), workers.c.started_at.is_not(None))
        .values(billed_to=workers.c.stopped_at)
    )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("billed_remainder")
        batch.drop_column("billed_to")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("low_balance_at")
        batch.drop_column("balance_micro")
    op.drop_table("ledger")
    op.drop_table("invoices")
    op.drop_table("rates")


def _opening_grant() -> int:
    """The opening grant in micro-credits: the sign-up grant the operator configured (the
    setting's default when this migration was written: 100 credits). Read here, not through the
    application's settings and money code, so that this migration does the same thing whatever
    later versions of those do."""
    raw = os.environ.get("CIPHERPOOL_CREDITS_SIGNUP_GRANT", "100")
    try:
        micro = Decimal(raw) * 1_000_000
    except InvalidOperation:
        raise ValueError(f"CIPHERPOOL_CREDITS_SIGNUP_GRANT={raw!r} is not a number of credits") from None
    if not micro.is_finite() or micro != micro.to_integral_value() or micro < 0:
        raise ValueError(f"CIPHERPOOL_CREDITS_SIGNUP_GRANT={raw!r} is not a whole number of micro-credits")
    return int(micro)
