"""Backends: what each model version was compiled for, and which nodes can run GPU circuits.

Revision ID: 0006_backends
Revises: 0005_operations
Create Date: 2026-12-06

* ``model_versions.backend``: ``cpu``, or ``gpu`` for a circuit compiled with
  ``device="cuda"`` (read from the server.zip's configuration at deploy). Existing versions
  become ``cpu``: the migration cannot read the blob store. A version compiled for the GPU
  before this release is redeployed to be recorded as such.
* ``pool_nodes.gpu_build``: the node's concrete has the GPU build and sees a GPU (a gpu node
  says so when it registers; existing rows: false until the node registers again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0006_backends"
down_revision: str | Sequence[str] | None = "0005_operations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("backend", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default="cpu"))
    with op.batch_alter_table("pool_nodes") as batch:
        batch.add_column(sa.Column("gpu_build", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("pool_nodes") as batch:
        batch.drop_column("gpu_build")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("backend")
