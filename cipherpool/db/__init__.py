"""Durable state: SQLModel tables, engine, the unit-of-work session scope and the schema
migrations that make and change the tables."""

from cipherpool.db.engine import (
    Upgrade,
    current_revision,
    get_engine,
    head_revision,
    init_db,
    session_scope,
    upgrade_db,
)

__all__ = ["Upgrade", "current_revision", "get_engine", "head_revision", "init_db", "session_scope", "upgrade_db"]
