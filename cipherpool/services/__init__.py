"""Business logic as plain functions over a database session; tasks and the CLI call these.

Services never commit: the caller's :func:`cipherpool.db.session_scope` owns the transaction.
Every lookup is scoped to an account, so one tenant cannot reach another's rows even by id.
"""
