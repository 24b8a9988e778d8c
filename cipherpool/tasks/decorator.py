"""``platform_task``: the decorator that gives every control task its shape, decode ->
authorise -> service call -> result envelope. (The query task has its own path, top to bottom
in :mod:`cipherpool.workers.query`, because its refusals must also reach the node's hooks.)

Expected failures (bad input, auth, not found) return ``{"ok": false, "error": ...}`` as a
SUCCESS result: the task did its job, which was to refuse. So does an outage of the database
or Redis (``database_unavailable``, ``broker_unavailable``): beat's jobs run again at their
next tick, and the log says so once per change of state. Only bugs and lost infrastructure
become Celery FAILUREs (and show red in Flower). Senders pass
:func:`cipherpool.messages.redacted_kwargs` as ``kwargsrepr``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from cipherpool.errors import CipherpoolError
from cipherpool.messages import Envelope, failed, ok
from cipherpool.outages import OUTAGE_TYPES, outage_error
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.tasks")


def celery_task(app: Celery, **options: Any) -> Callable[[Callable[..., Envelope]], Task]:
    """``@app.task(**options)``, typed: Celery ships no types, so mypy sees the decorator
    take a function whose result is an envelope and give back a Celery ``Task``."""

    def register(fn: Callable[..., Envelope]) -> Task:
        return app.task(**options)(fn)

    return register


def platform_task(app: Celery, name: str, **options: Any) -> Callable[[Callable[..., object]], Task]:
    """Register ``fn(**kwargs)`` as task ``name`` whose result is always an envelope."""

    def decorate(fn: Callable[..., object]) -> Task:
        waiting = StateLog(log, f"{name}: the database or Redis")

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Envelope:
            try:
                result = ok(fn(**kwargs))
            except CipherpoolError as exc:
                log.info("%s refused: %s: %s", name, exc.code, exc.message)
                return failed(exc)
            except OUTAGE_TYPES as exc:
                outage = outage_error(exc)
                if outage is None:
                    raise
                # The database or Redis is down, or the schema not migrated yet (any start
                # order): the next run tries again; one line per change, not a traceback per tick.
                waiting.failed(exc)
                return failed(outage)
            waiting.recovered("answering again")
            return result

        return celery_task(app, name=name, **options)(run)

    return decorate
