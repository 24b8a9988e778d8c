"""Durable state: SQLModel tables, engine and the unit-of-work session scope."""

from cipherpool.db.engine import get_engine, init_db, session_scope

__all__ = ["get_engine", "init_db", "session_scope"]
