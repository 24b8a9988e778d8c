"""Keys with a lifecycle: last use and expiry of key sets, and blobs waiting to be swept.

Revision ID: 0008_key_lifecycle
Revises: 0007_capabilities
Create Date: 2026-12-20

* ``evaluation_keys.last_used_at``: a key set's last query or warm-up, flushed from Redis by
  beat's key sweep. Existing key sets get the upgrade's moment: their use before it was never
  recorded, and each must have a whole idle period before it can expire.
* ``evaluation_keys.expired_at`` (indexed): when the key set expired (idle, or its token
  expired); its row is kept so that a query with it is told so.
* ``blob_candidates``: content-addressed blobs a row stopped referencing, with when; beat's
  key sweep removes each from the store after a grace period if nothing references it then.

The downgrade deletes expired key sets (their blobs may be gone) and forgets the marks (the
blobs they name stay, unreferenced, for `cipherpool store check`). Self-contained: nothing of the application is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0008_key_lifecycle"
down_revision: str | Sequence[str] | None = "0007_capabilities"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

evaluation_keys = sa.table(
    "evaluation_keys", sa.column("last_used_at", sa.DateTime(timezone=True)), sa.column("expired_at", sa.DateTime(timezone=True))
)


def upgrade() -> None:
    with op.batch_alter_table("evaluation_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_evaluation_keys_expired_at"), ["expired_at"], unique=False)
    op.execute(evaluation_keys.update().values(last_used_at=datetime.now(UTC)))
    op.create_table(
        "blob_candidates",
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("blob_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("marked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "blob_id"),
    )
    with op.batch_alter_table("blob_candidates") as batch:
        batch.create_index(batch.f("ix_blob_candidates_marked_at"), ["marked_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("blob_candidates") as batch:
        batch.drop_index(batch.f("ix_blob_candidates_marked_at"))
    op.drop_table("blob_candidates")
    # An expired key set's blob may be gone: without the column its row would look usable again.
    op.execute(evaluation_keys.delete().where(evaluation_keys.c.expired_at.is_not(None)))
    with op.batch_alter_table("evaluation_keys") as batch:
        batch.drop_index(batch.f("ix_evaluation_keys_expired_at"))
        batch.drop_column("expired_at")
        batch.drop_column("last_used_at")
