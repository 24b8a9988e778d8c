"""Management plane: model versions, model events, token assignments and account details.

Revision ID: 0002_management
Revises: 0001_baseline
Create Date: 2026-11-21

Data moves, not only columns:

* each model's artifact (blobs, concrete versions) becomes its version 1 in ``model_versions``;
* each token's one model becomes its one row in ``token_models``;
* each evaluation key remembers the client specs it was made from (its model's client.zip).

The downgrade moves them back: a model takes its current version's artifact, a token its
first assigned model (a token assigned to none cannot exist before this revision: dropped).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0002_management"
down_revision: str | Sequence[str] | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ARTIFACT_COLUMNS = ("client_blob", "server_blob", "concrete_ml_version", "concrete_python_version", "python_version")


def _str(name: str, nullable: bool = False, **kw: object) -> sa.Column[str]:
    return sa.Column(name, sqlmodel.sql.sqltypes.AutoString(), nullable=nullable, **kw)  # type: ignore[arg-type]


def _when(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _int(name: str, nullable: bool = False, **kw: object) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=nullable, **kw)  # type: ignore[arg-type]


def _table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), autoload_with=op.get_bind())


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "model_events",
        _int("id"),
        _str("account_id"),
        _str("model_id"),
        _when("at"),
        _str("kind"),
        _str("message"),
        _str("worker_id", nullable=True),
        _int("version", nullable=True),
        _str("token_id", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
    )
    op.create_index("ix_model_events_account_id", "model_events", ["account_id"])
    op.create_index("ix_model_events_model_id", "model_events", ["model_id"])

    op.create_table(
        "model_versions",
        _str("id"),
        _str("model_id"),
        _int("number"),
        _str("client_blob"),
        _str("server_blob"),
        _int("client_size"),
        _int("server_size"),
        _str("concrete_ml_version"),
        _str("concrete_python_version"),
        _str("python_version"),
        _str("input_shape", nullable=True),
        _str("input_dtype", nullable=True),
        _str("note"),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "number"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"])

    op.create_table(
        "token_models",
        _str("token_id"),
        _str("model_id"),
        _when("created_at"),
        sa.PrimaryKeyConstraint("token_id", "model_id"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["token_id"], ["access_tokens.id"]),
    )
    op.create_index("ix_token_models_model_id", "token_models", ["model_id"])

    with op.batch_alter_table("accounts") as batch:
        batch.add_column(_str("organisation", nullable=True))
        batch.add_column(_str("contact_email", nullable=True))
        batch.add_column(_when("updated_at", nullable=True))
        batch.add_column(_when("disabled_at", nullable=True))
        batch.drop_index("ix_accounts_name")
        batch.create_index("ix_accounts_name", ["name"], unique=False)

    with op.batch_alter_table("models") as batch:
        batch.add_column(_str("description", server_default=""))
        batch.add_column(_int("min_workers", server_default="0"))
        batch.add_column(_int("max_workers", server_default="1"))
        batch.add_column(sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(_int("version", server_default="1"))
        batch.add_column(_int("rollout_version", nullable=True))

    models, versions = _table("models"), _table("model_versions")
    rows = bind.execute(sa.select(models.c.id, models.c.created_at, *(models.c[c] for c in ARTIFACT_COLUMNS))).all()
    for row in rows:
        values = {c: row._mapping[c] for c in ARTIFACT_COLUMNS}
        bind.execute(
            sa.insert(versions).values(
                id=uuid.uuid4().hex[:16],
                model_id=row.id,
                number=1,
                client_size=0,
                server_size=0,
                note="",
                created_at=row.created_at,
                **values,
            )
        )

    with op.batch_alter_table("evaluation_keys") as batch:
        batch.add_column(_str("client_blob", server_default=""))
    keys = _table("evaluation_keys")
    bind.execute(
        sa.update(keys).values(
            client_blob=sa.select(models.c.client_blob).where(models.c.id == keys.c.model_id).scalar_subquery()
        )
    )

    tokens, assignments = _table("access_tokens"), _table("token_models")
    bind.execute(
        sa.insert(assignments).from_select(
            ["token_id", "model_id", "created_at"], sa.select(tokens.c.id, tokens.c.model_id, tokens.c.created_at)
        )
    )

    with op.batch_alter_table("access_tokens") as batch:
        batch.add_column(_when("updated_at", nullable=True))
        batch.add_column(_when("disabled_at", nullable=True))
        batch.add_column(_int("quota", nullable=True))
        batch.drop_index("ix_access_tokens_model_id")
        if bind.dialect.name != "sqlite":  # SQLite's batch copy drops the unnamed key with its column
            batch.drop_constraint("access_tokens_model_id_fkey", type_="foreignkey")
        batch.drop_column("model_id")

    with op.batch_alter_table("models") as batch:
        for column in ARTIFACT_COLUMNS:
            batch.drop_column(column)

    with op.batch_alter_table("workers") as batch:
        batch.add_column(_int("version", nullable=True))
        batch.add_column(_str("stop_reason", nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    accounts = _table("accounts")
    shared = bind.execute(sa.select(accounts.c.name).group_by(accounts.c.name).having(sa.func.count() > 1)).first()
    if shared is not None:  # 0001 has names unique
        raise RuntimeError(f"Cannot downgrade: several accounts are named {shared[0]!r}; rename them first.")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("stop_reason")
        batch.drop_column("version")

    with op.batch_alter_table("models") as batch:
        for column in ARTIFACT_COLUMNS:
            batch.add_column(_str(column, server_default=""))
    models, versions = _table("models"), _table("model_versions")
    for column in ARTIFACT_COLUMNS:
        bind.execute(
            sa.update(models).values(
                {
                    column: sa.select(versions.c[column])
                    .where(versions.c.model_id == models.c.id, versions.c.number == models.c.version)
                    .scalar_subquery()
                }
            )
        )

    with op.batch_alter_table("access_tokens") as batch:
        batch.add_column(_str("model_id", nullable=True))
    tokens, assignments, keys = _table("access_tokens"), _table("token_models"), _table("evaluation_keys")
    bind.execute(
        sa.update(tokens).values(
            model_id=sa.select(sa.func.min(assignments.c.model_id)).where(assignments.c.token_id == tokens.c.id).scalar_subquery()
        )
    )
    orphans = sa.select(tokens.c.id).where(tokens.c.model_id.is_(None))
    bind.execute(sa.delete(keys).where(keys.c.token_id.in_(orphans)))
    bind.execute(sa.delete(tokens).where(tokens.c.model_id.is_(None)))
    with op.batch_alter_table("access_tokens") as batch:
        batch.alter_column("model_id", nullable=False, existing_type=sqlmodel.sql.sqltypes.AutoString())
        batch.create_foreign_key("access_tokens_model_id_fkey", "models", ["model_id"], ["id"])
        batch.create_index("ix_access_tokens_model_id", ["model_id"], unique=False)
        batch.drop_column("quota")
        batch.drop_column("disabled_at")
        batch.drop_column("updated_at")

    with op.batch_alter_table("evaluation_keys") as batch:
        batch.drop_column("client_blob")

    with op.batch_alter_table("models") as batch:
        for column in ("rollout_version", "version", "shared", "max_workers", "min_workers", "description"):
            batch.drop_column(column)

    with op.batch_alter_table("accounts") as batch:
        batch.drop_index("ix_accounts_name")
        batch.create_index("ix_accounts_name", ["name"], unique=True)
        for column in ("disabled_at", "updated_at", "contact_email", "organisation"):
            batch.drop_column(column)

    for table in ("token_models", "model_versions", "model_events"):
        op.drop_table(table)
