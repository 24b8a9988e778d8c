"""Pool nodes with profiles and capacity, worker statuses of the lifecycle, node selectors.

Revision ID: 0003_pool
Revises: 0002_management
Create Date: 2026-11-21

* ``pool_nodes`` learn their profile, labels, sharing, host and capacity (cores, memory,
  GPUs, key cache);
* ``models`` get a ``node_selector`` (labels a node must carry), ``workers`` the profile
  asked for and the ``standby`` wish;
* ``workers.status`` becomes a plain string holding the status's value (``pending``,
  ``loading``, ``up``, ``standby``, ...), not a database enum of member names, so later
  statuses need no migration: STARTING becomes ``pending``, RUNNING ``up``, the others their
  lower-case names. The downgrade maps ``loading`` to STARTING and ``standby`` to RUNNING.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0003_pool"
down_revision: str | Sequence[str] | None = "0002_management"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED")  # 0001's enum, frozen here
UP = {"STARTING": "pending", "RUNNING": "up", "STOPPING": "stopping", "STOPPED": "stopped", "FAILED": "failed"}
DOWN = {
    "pending": "STARTING",
    "loading": "STARTING",
    "up": "RUNNING",
    "standby": "RUNNING",
    "stopping": "STOPPING",
    "stopped": "STOPPED",
    "failed": "FAILED",
}
NODE_COLUMNS = ("profile", "labels", "shared", "host", "cores", "memory_bytes", "gpus", "key_cache_bytes")


def _str(name: str, default: str) -> sa.Column[str]:
    return sa.Column(name, sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=default)


def _int(name: str, big: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger() if big else sa.Integer(), nullable=False, server_default="0")


def _bool(name: str) -> sa.Column[bool]:
    return sa.Column(name, sa.Boolean(), nullable=False, server_default=sa.false())


def _recode(mapping: dict[str, str]) -> None:
    workers = sa.table("workers", sa.column("status", sa.String()))
    for old, new in mapping.items():
        op.get_bind().execute(sa.update(workers).where(workers.c.status == old).values(status=new))


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table("pool_nodes") as batch:
        batch.add_column(_str("profile", "default"))
        batch.add_column(_str("labels", "{}"))
        batch.add_column(_bool("shared"))
        batch.add_column(_str("host", ""))
        batch.add_column(_int("cores"))
        batch.add_column(_int("memory_bytes", big=True))
        batch.add_column(_int("gpus"))
        batch.add_column(_int("key_cache_bytes", big=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(_str("node_selector", "{}"))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(_bool("standby"))
        batch.alter_column("status", type_=sa.String(), existing_nullable=False, postgresql_using="status::text")
    if postgres:
        op.execute("DROP TYPE IF EXISTS workerstatus")
    _recode(UP)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    _recode(DOWN)
    enum = sa.Enum(*OLD_STATUSES, name="workerstatus")
    if postgres:
        enum.create(op.get_bind())
    with op.batch_alter_table("workers") as batch:
        batch.alter_column("status", type_=enum, existing_nullable=False, postgresql_using="status::workerstatus")
        batch.drop_column("standby")
        batch.drop_column("profile")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("node_selector")
    with op.batch_alter_table("pool_nodes") as batch:
        for column in reversed(NODE_COLUMNS):
            batch.drop_column(column)
