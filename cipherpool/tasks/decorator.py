"""``platform_task``: the decorator that gives every control task its shape, decode ->
authorise -> service call -> result envelope. (The query task has its own path, top to bottom
in :mod:`cipherpool.workers.query`, because its refusals must also reach the node's hooks.)

Expected failures (bad input, auth, not found) return ``{"ok": false, "error": ...}`` as a
SUCCESS result: the task did its job, which was to refuse. Only bugs and lost infrastructure
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
        @functools.wraps(fn)
        def run(**kwargs: Any) -> Envelope:
            try:
                return ok(fn(**kwargs))
            except CipherpoolError as exc:
                log.info("%s refused: %s: %s", name, exc.code, exc.message)
                return failed(exc)

        return celery_task(app, name=name, **options)(run)

    return decorate
