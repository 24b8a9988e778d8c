"""What a dependency's outage looks like from inside a platform process, and the typed error
it stands for.

The database down or not migrated yet, Redis or the broker unreachable: these are outages to
wait out, not faults of a request or of the code. The gateway answers them with a typed 503
and Retry-After (``database_unavailable``, ``broker_unavailable``) instead of the 502 of a
bug; beat's jobs on the control worker log them once per change of state instead of a
traceback per tick. One classification for both, here, below the gateway and the tasks.
"""

from __future__ import annotations

import logging

import kombu.exceptions
import redis
from sqlalchemy import exc as sa_exc

from cipherpool.errors import BrokerUnavailable, DatabaseUnavailable, PlatformError, StoreFull
from cipherpool.waiting import describe_failure as describe

__all__ = ["OUTAGE_TYPES", "describe", "logged_outage", "outage_error"]

# What a dependency's outage raises into a route or the guard: mapped by outage_error.
OUTAGE_TYPES: tuple[type[Exception], ...] = (
    sa_exc.SQLAlchemyError,
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    redis.exceptions.OutOfMemoryError,
)
# PostgreSQL's undefined_table and undefined_column: a schema behind this gateway's code.
MISSING_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
SQLITE_MISSING_SCHEMA = ("no such table", "no such column")
DATABASE_DOWN = "The platform's database is unavailable; retry in a few seconds."
SCHEMA_BEHIND = (
    "The platform's database schema is not migrated to this gateway's version yet; "
    "retry in a few seconds (the operator runs `cipherpool db upgrade`)."
)
STORE_DOWN = "The platform's Redis (broker and store) is unavailable; retry in a few seconds."
REDIS_FULL = (
    "The platform's Redis is full (maxmemory; nothing is evicted), so it refuses writes: reads, polls and "
    "deletes still work. Try later, or ask the operator to free memory or raise "
    "CIPHERPOOL_REDIS_MAXMEMORY_BYTES."
)


def outage_error(exc: BaseException) -> PlatformError | None:
    """The typed 503 that ``exc`` stands for when it is a dependency's outage (a database
    connection refused, dropped or timed out, a schema not migrated yet, Redis or the broker
    unreachable), or the 507 of a Redis that refuses writes at maxmemory; None when it is
    anything else, a bug the caller answers as one."""
    if isinstance(exc, sa_exc.DBAPIError):
        if _missing_schema(exc):
            return DatabaseUnavailable(SCHEMA_BEHIND)
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return DatabaseUnavailable(DATABASE_DOWN)
        return None
    if isinstance(exc, sa_exc.TimeoutError):  # every pooled connection busy past the pool's timeout
        return DatabaseUnavailable(DATABASE_DOWN)
    if redis_full(exc):  # a write refused at maxmemory (also wrapped by kombu): 507, never a 502
        return StoreFull(REDIS_FULL)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)):
        return BrokerUnavailable(STORE_DOWN)
    return None


def redis_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write at ``maxmemory`` (``-OOM ...``), also when it
    comes wrapped (a publish through kombu, a pipeline)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, redis.exceptions.OutOfMemoryError) or (
            isinstance(seen, redis.ResponseError) and str(seen).startswith("OOM")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def logged_outage(exc: BaseException, method: str, path: str, logger: logging.Logger) -> PlatformError | None:
    """What the gateway answers a request that met ``exc``: its typed 503 (:func:`outage_error`),
    logged as one WARNING line with no traceback (an outage is no fault of the code, and a
    traceback per request would bury the log); None when ``exc`` is no outage, which the
    caller answers as the fault it is. One rule for the routes' exception handlers
    (:mod:`cipherpool.gateway.app`) and the guard, which runs outside them."""
    typed = outage_error(exc)
    if typed is not None:
        logger.warning("%s %s: %s (%s)", method, path, typed.code, describe(exc))
    return typed


def _missing_schema(exc: sa_exc.DBAPIError) -> bool:
    if getattr(exc.orig, "sqlstate", None) in MISSING_SCHEMA_SQLSTATES:
        return True
    return isinstance(exc, sa_exc.OperationalError) and str(exc.orig).startswith(SQLITE_MISSING_SCHEMA)
