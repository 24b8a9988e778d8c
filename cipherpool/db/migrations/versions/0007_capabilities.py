"""Capabilities: each pool node reports the backends it can run, not whether it has the GPU build.

Revision ID: 0007_capabilities
Revises: 0006_backends
Create Date: 2026-12-06

* ``pool_nodes.capabilities``: a JSON list of backend names whose probe passed on the node
  when it registered (cipherpool.backends). ``pool_nodes.gpu_build`` becomes
  ``["cpu", "gpu"]`` where it was true, ``["cpu"]`` elsewhere, and is dropped.

The downgrade sets ``gpu_build`` where the capabilities name ``gpu`` and drops them. Self-contained:
the names are the backends of 0006, spelled here, not read from the application.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0007_capabilities"
down_revision: str | Sequence[str] | None = "0006_backends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CPU_ONLY = '["cpu"]'  # json.dumps of the lists, as nodes write them
WITH_GPU = '["cpu", "gpu"]'
GPU_PATTERN = '%"gpu"%'

pool_nodes = sa.table("pool_nodes", sa.column("capabilities", sa.String()), sa.column("gpu_build", sa.Boolean()))


def upgrade() -> None:
    with op.batch_alter_table("pool_nodes") as batch:
        batch.add_column(sa.Column("capabilities", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=CPU_ONLY))
    op.execute(pool_nodes.update().where(pool_nodes.c.gpu_build.is_(True)).values(capabilities=WITH_GPU))
    with op.batch_alter_table("pool_nodes") as batch:
        batch.drop_column("gpu_build")


def downgrade() -> None:
    with op.batch_alter_table("pool_nodes") as batch:
        batch.add_column(sa.Column("gpu_build", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(pool_nodes.update().where(pool_nodes.c.capabilities.like(GPU_PATTERN)).values(gpu_build=True))
    with op.batch_alter_table("pool_nodes") as batch:
        batch.drop_column("capabilities")
