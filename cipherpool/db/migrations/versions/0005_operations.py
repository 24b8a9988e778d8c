"""Operations: worker schedules, alert rules and their events, autoscaling policies.

Revision ID: 0005_operations
Revises: 0004_credits
Create Date: 2026-11-22

* ``schedules`` (recurring windows as cron expressions with a time zone, or one-off
  reservations) and ``schedule_actions`` (each start or stop applied to a window, unique per
  schedule, window and action, so two beats never apply one twice);
* ``alert_rules`` (a threshold on a model's query figures, an optional signed webhook) and
  ``alert_events`` (fired, cleared, and how the webhook call went);
* ``autoscale_policies`` (opt-in, one per model);
* ``workers.started_by`` (user, schedule, autoscaler, reconciler; existing rows: user) and
  ``workers.schedule_id``.

No data moves; the downgrade drops it all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0005_operations"
down_revision: str | Sequence[str] | None = "0004_credits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sqlmodel.sql.sqltypes.AutoString(), nullable=nullable)


def _time(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _float(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def _bool(name: str) -> sa.Column[bool]:
    return sa.Column(name, sa.Boolean(), nullable=False)


def _indexes(table: str, *columns: str) -> None:
    with op.batch_alter_table(table) as batch:
        for column in columns:
            batch.create_index(batch.f(f"ix_{table}_{column}"), [column], unique=False)


def upgrade() -> None:
    op.create_table(
        "schedules",
        _str("id"),
        _str("account_id"),
        _str("model_id"),
        _str("name"),
        _str("kind"),
        _str("start_cron", True),
        _str("stop_cron", True),
        _str("timezone"),
        _time("starts_at", True),
        _time("ends_at", True),
        _int("workers"),
        _str("profile", True),
        _bool("paused"),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _indexes("schedules", "account_id", "model_id")
    op.create_table(
        "schedule_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        _str("schedule_id"),
        _time("window_start"),
        _str("action"),
        _str("status"),
        _int("attempts"),
        _time("at"),
        _str("message"),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedules.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "window_start", "action"),
    )
    _indexes("schedule_actions", "schedule_id")
    op.create_table(
        "alert_rules",
        _str("id"),
        _str("account_id"),
        _str("model_id"),
        _str("metric"),
        _float("threshold"),
        _int("window_s"),
        _str("webhook_url", True),
        _str("webhook_secret", True),
        _str("state"),
        _float("value", True),
        _time("evaluated_at", True),
        _time("changed_at", True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "metric"),
    )
    _indexes("alert_rules", "account_id", "model_id")
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer(), nullable=False),
        _str("rule_id"),
        _str("account_id"),
        _str("model_id"),
        _str("metric"),
        _str("kind"),
        _float("value", True),
        _float("threshold"),
        _time("at"),
        _str("delivery"),
        _int("attempts"),
        _str("last_error", True),
        _time("delivered_at", True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _indexes("alert_events", "account_id", "at", "model_id", "rule_id")
    op.create_table(
        "autoscale_policies",
        _str("model_id"),
        _str("account_id"),
        _bool("enabled"),
        _float("target_queue_wait_s", True),
        _int("target_queue_depth", True),
        _float("scale_up_after_s"),
        _float("idle_after_s"),
        _float("cooldown_up_s"),
        _float("cooldown_down_s"),
        _time("above_since", True),
        _time("idle_since", True),
        _time("last_scaled_at", True),
        _str("last_action", True),
        _str("last_reason", True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.PrimaryKeyConstraint("model_id"),
    )
    _indexes("autoscale_policies", "account_id")
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("started_by", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default="user"))
        batch.add_column(_str("schedule_id", True))
        batch.create_index(batch.f("ix_workers_schedule_id"), ["schedule_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_index(batch.f("ix_workers_schedule_id"))
        batch.drop_column("schedule_id")
        batch.drop_column("started_by")
    for table in ("autoscale_policies", "alert_events", "alert_rules", "schedule_actions", "schedules"):
        op.drop_table(table)
