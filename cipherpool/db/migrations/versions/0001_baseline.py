"""Baseline: the schema as ``SQLModel.metadata.create_all`` made it before migrations.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-21

Databases made by that create_all are stamped at this revision, not migrated through it
(:mod:`cipherpool.db.migrate`), so it must stay exactly what create_all produced:

* strings are SQLModel's AutoString (VARCHAR without length; 255 on MySQL);
* datetimes are ``DateTime(timezone=True)``: the DDL of SQLModel's UTCDateTime, whose
  UTC handling is Python-side only;
* statuses are ``sa.Enum`` of the member *names* (what SQLAlchemy stores for a Python enum),
  a native ENUM type on PostgreSQL and a VARCHAR without CHECK on SQLite. The names are
  written out here, not read from cipherpool.statuses: a migration is frozen in time;
* constraints in create_all's order (primary key, unique, foreign keys), unique ones
  unnamed; indexes named ``ix_<table>_<column>`` as SQLModel names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0001_baseline"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENUMS = {
    "modelstatus": ("DEPLOYED", "ACTIVE", "INACTIVE"),
    "workerstatus": ("STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED"),
    "nodestatus": ("ONLINE", "OFFLINE"),
}


def _str(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sqlmodel.sql.sqltypes.AutoString(), nullable=nullable)


def _when(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _status(name: str) -> sa.Column[str]:
    return sa.Column("status", sa.Enum(*ENUMS[name], name=name), nullable=False)


def _index(table: str, column: str, unique: bool = False) -> None:
    op.create_index(f"ix_{table}_{column}", table, [column], unique=unique)


def upgrade() -> None:
    op.create_table(
        "accounts",
        _str("id"),
        _str("name"),
        _str("api_key_hash"),
        _str("api_key_prefix"),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("accounts", "api_key_hash", unique=True)
    _index("accounts", "name", unique=True)

    op.create_table(
        "pool_nodes",
        _str("name"),
        _str("host_class"),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=True),
        _status("nodestatus"),
        _str("worker_id", nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        _when("started_at"),
        _when("last_seen"),
        sa.PrimaryKeyConstraint("name"),
    )

    op.create_table(
        "models",
        _str("id"),
        _str("account_id"),
        _str("name"),
        _status("modelstatus"),
        _str("hardware"),
        _str("client_blob"),
        _str("server_blob"),
        _str("concrete_ml_version"),
        _str("concrete_python_version"),
        _str("python_version"),
        _when("created_at"),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "name"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
    )
    _index("models", "account_id")

    op.create_table(
        "access_tokens",
        _str("id"),
        _str("account_id"),
        _str("model_id"),
        _str("name"),
        _str("token_hash"),
        _str("prefix"),
        _when("created_at"),
        _when("expires_at", nullable=True),
        _when("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
    )
    _index("access_tokens", "account_id")
    _index("access_tokens", "model_id")
    _index("access_tokens", "token_hash", unique=True)

    op.create_table(
        "workers",
        _str("id"),
        _str("account_id"),
        _str("model_id"),
        _str("node_name"),
        _status("workerstatus"),
        _str("error", nullable=True),
        _when("created_at"),
        _when("started_at", nullable=True),
        _when("stopped_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["node_name"], ["pool_nodes.name"]),
    )
    _index("workers", "account_id")
    _index("workers", "model_id")
    _index("workers", "node_name")

    op.create_table(
        "evaluation_keys",
        sa.Column("id", sa.Integer(), nullable=False),  # autoincrement: SERIAL on PostgreSQL
        _str("key_id"),
        _str("blob_id"),
        _str("token_id"),
        _str("model_id"),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_id", "key_id"),
        sa.ForeignKeyConstraint(["token_id"], ["access_tokens.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
    )
    _index("evaluation_keys", "key_id")
    _index("evaluation_keys", "model_id")
    _index("evaluation_keys", "token_id")


def downgrade() -> None:
    # Dropping a table drops its indexes; PostgreSQL's enum types outlive their tables.
    for table in ("evaluation_keys", "workers", "access_tokens", "models", "pool_nodes", "accounts"):
        op.drop_table(table)
    for name in ENUMS:
        sa.Enum(name=name).drop(op.get_bind(), checkfirst=True)
