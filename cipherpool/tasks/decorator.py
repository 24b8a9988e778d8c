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

from celery import Celery

from cipherpool.errors import CipherpoolError
from cipherpool.messages import failed, ok

log = logging.getLogger("cipherpool.tasks")


def platform_task(app: Celery, name: str, **options: Any) -> Callable:
    """Register ``fn(**kwargs)`` as task ``name`` whose result is always an envelope."""

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def run(**kwargs: Any) -> dict[str, Any]:
            try:
                return ok(fn(**kwargs))
            except CipherpoolError as exc:
                log.info("%s refused: %s: %s", name, exc.code, exc.message)
                return failed(exc)

        return app.task(name=name, **options)(run)

    return decorate
