"""${message}

Revision ID: ${up_revision}
Revises: ${comma(down_revision) if down_revision else "nothing (the first revision)"}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

# Imported even where unused (an empty or merge revision): autogenerate writes sa.*, op.* and
# sqlmodel.sql.sqltypes.AutoString() (SQLModel's str columns) without adding imports.
import sqlalchemy as sa  # noqa: F401
import sqlmodel.sql.sqltypes  # noqa: F401
from alembic import op  # noqa: F401
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
