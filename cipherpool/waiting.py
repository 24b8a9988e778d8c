"""Waiting for a condition with a deadline: one loop instead of one hand-written at each site.

Starting Redis, waiting for the stack to be ready and waiting for a worker's status to change
all poll a condition until it holds or time runs out. Written once, the edge cases are right
once: the condition is always checked at least once, a last time at the deadline (a sleep
never overshoots it), and the clock and sleep can be injected, so tests need no real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Clock = Callable[[], float]  # seconds, monotonic
Sleep = Callable[[float], None]


class WaitTimeout(TimeoutError):
    """The condition did not hold within the timeout (raised when no other error is given)."""


def wait_until(predicate: Callable[[], T | None], timeout_s: float, *, interval_s: float = 0.2,
               error: BaseException | None = None, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval_s`` for ``timeout_s``.

    On timeout, raises ``error`` (an instance, so each caller keeps its own message and type),
    else a WaitTimeout. An exception from the predicate ends the wait at once: that is how a
    caller fails early, e.g. when the process it waits for has died."""
    deadline = clock() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - clock()
        if remaining <= 0:
            raise error if error is not None else WaitTimeout(f"The condition did not hold within {timeout_s:g}s.")
        sleep(min(interval_s, remaining))
