"""Opaque ids: model events, ledger lines and alert events are shown by a random id, not by the
platform-wide integer sequence, whose gaps counted other accounts' events and charges.

Revision ID: 0009_public_ids
Revises: 0008_key_lifecycle
Create Date: 2026-12-21

* ``model_events.public_id`` (``ev_`` + 16 hex digits), ``ledger.public_id`` (``ln_``…) and
  ``alert_events.public_id`` (``al_``…): unique, indexed, not null. Existing rows are given one
  each. The integer ``id`` stays the rows' order (cursors such as ``?after=`` are resolved to
  it); it is no longer shown.

The downgrade drops the three columns. Self-contained: the prefixes and the id's form are
spelled here, not read from the application.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0009_public_ids"
down_revision: str | Sequence[str] | None = "0008_key_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = {"model_events": "ev_", "ledger": "ln_", "alert_events": "al_"}
BATCH = 1000


def _new(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:16]


def upgrade() -> None:
    conn = op.get_bind()
    for name, prefix in TABLES.items():
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("public_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        table = sa.table(name, sa.column("id", sa.Integer()), sa.column("public_id", sa.String()))
        ids = [row[0] for row in conn.execute(sa.select(table.c.id).order_by(table.c.id))]
        update = table.update().where(table.c.id == sa.bindparam("row_id")).values(public_id=sa.bindparam("new_id"))
        for start in range(0, len(ids), BATCH):
            conn.execute(update, [{"row_id": i, "new_id": _new(prefix)} for i in ids[start : start + BATCH]])
        with op.batch_alter_table(name) as batch:
            batch.alter_column("public_id", existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=False)
            batch.create_index(batch.f(f"ix_{name}_public_id"), ["public_id"], unique=True)


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            batch.drop_index(batch.f(f"ix_{name}_public_id"))
            batch.drop_column("public_id")
