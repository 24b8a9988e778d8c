"""Waiting for a condition with a deadline: one loop instead of one hand-written at each site.

Starting Redis, waiting for the stack to be ready and waiting for a worker's status to change
all poll a condition until it holds or time runs out. Written once, the edge cases are right
once: the condition is always checked at least once, a last time at the deadline (a sleep
never overshoots it), and the clock and sleep can be injected, so tests need no real time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from cipherpool.errors import CipherpoolError

T = TypeVar("T")
Clock = Callable[[], float]  # seconds, monotonic
Sleep = Callable[[float], None]


class WaitTimeout(TimeoutError):
    """The condition did not hold within the timeout (raised when no other error is given)."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float,
    *,
    interval_s: float = 0.2,
    error: BaseException | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> T:
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


class Backoff:
    """Pauses between tries of something that is down (a database not yet reachable, a schema
    not yet migrated): ``first_s``, doubled at each try up to ``max_s``, each shortened by a
    random part of up to ``jitter`` (25 % unless given) so that many processes started
    together do not retry in step. ``reset()`` once it worked."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0, rng: Callable[[], float] | None = None, jitter: float = 0.25):
        import random

        self.first_s, self.max_s, self.jitter = first_s, max_s, jitter
        self.tries = 0
        self._rng = rng or random.random

    def next(self) -> float:
        pause: float = min(self.max_s, self.first_s * 2.0 ** min(self.tries, 30))
        self.tries += 1
        return pause * (1.0 - self.jitter * float(self._rng()))

    def reset(self) -> None:
        self.tries = 0


class StateLog:
    """Logs what a retried thing is waiting for once per change of state, not once per try:
    an operator reads "waiting for the database: connection refused" once, then "database
    reachable" when it is, instead of a traceback every few seconds.

    Two ways to use it:

    * :meth:`failed` / :meth:`recovered`: ``"<what>: <the exception in one line>; trying
      again"``, logged again when the problem changes (refused, then timed out), and
      ``"<what>: <message>"`` once it works;
    * :meth:`down` / :meth:`up`: a message of the caller's own (``%``-style, with its
      arguments), logged once per streak whatever the problem, and an optional one at its
      end, which can be given how long the streak lasted.

    ``level`` is the level of a failure's line, ``recovered_level`` of a recovery's (both
    WARNING unless given). Thread-safe: several threads may report to one StateLog, and each
    change is still logged once."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str = "",
        *,
        level: int = logging.WARNING,
        recovered_level: int = logging.WARNING,
        clock: Clock = time.monotonic,
    ):
        self.logger, self.what = logger, what
        self.level, self.recovered_level = level, recovered_level
        self.problem: str | None = None
        self.since: float | None = None  # when the streak began (``clock``), None while it works
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self.problem is not None

    def failed(self, exc: BaseException) -> None:
        problem = describe_failure(exc)
        if self._enter(problem, per_problem=True):
            self.logger.log(self.level, "%s: %s; trying again", self.what, problem)

    def recovered(self, message: str) -> None:
        if self._leave() is not None:
            self.logger.log(self.recovered_level, "%s: %s", self.what, message)

    def down(self, message: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``message % args`` if this begins a streak of failures (with the exception being
        handled when ``exc_info``); whether it did."""
        if not self._enter("down", per_problem=False):
            return False
        self.logger.log(self.level, message, *args, exc_info=exc_info)
        return True

    def up(self, message: str | None = None, *args: object, lasted: bool = False) -> float | None:
        """End a streak, if one runs: log ``message % args`` (nothing when None), with how long
        the streak lasted (seconds) as the last argument when ``lasted``. That duration, or
        None when nothing was failing."""
        lasted_s = self._leave()
        if lasted_s is not None and message is not None:
            self.logger.log(self.recovered_level, message, *args, *((lasted_s,) if lasted else ()))
        return lasted_s

    def _enter(self, problem: str, per_problem: bool) -> bool:
        with self._lock:
            if self.problem is not None and (not per_problem or problem == self.problem):
                return False
            if self.problem is None:
                self.since = self._clock()
            self.problem = problem
            return True

    def _leave(self) -> float | None:
        with self._lock:
            if self.problem is None:
                return None
            since, self.problem, self.since = self.since, None, None
            return self._clock() - since if since is not None else 0.0


def describe_failure(exc: BaseException) -> str:
    """An exception in one line for an operator's log: its type and the first line of its
    message; for a database error, the driver's own (SQLAlchemy's text would add the
    statement and its parameters), for a typed error raised from another, that cause."""
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    if inner is exc and isinstance(exc, CipherpoolError) and exc.__cause__ is not None:
        inner = exc.__cause__
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first[:300]}"
