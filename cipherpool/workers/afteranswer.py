"""Redis writes a query makes that its answer must not wait for.

A query's task made two round trips of bookkeeping on its answer's path: before its compute,
it forgot its in-flight record (:mod:`cipherpool.inflight`: beat no longer needs to send it
again); after its compute, it counted itself for usage reports
(:mod:`cipherpool.billing.querycounts`). Neither changes the answer, so both are now queued
here while the task runs, and sent in one pipelined round trip right after Celery stored and
published the result (``task_postrun``, on the thread that ran the task).

What that moves:

* the in-flight record lives for the query's compute rather than until its start. Beat's
  redelivery looks only at records older than ``redelivery_grace_s``, and forgets any whose
  query has a result key (Celery writes STARTED before the task runs), so a running query is
  never sent again;
* a query is counted a moment after its answer is stored rather than a moment before;
* a node killed during a query loses both writes, as it lost the count before: beat forgets
  the record once it sees the query started, and a killed node's query is not counted.

A failed write is logged and dropped: bookkeeping is never worth a query, and the record
expires by itself (its TTL is the query's deadline).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from redis import Redis

log = logging.getLogger("cipherpool.node")
Command = tuple[str | bytes | int | float, ...]


class AfterAnswer:
    """The writes queued by the task that runs on this thread, sent by :meth:`send`.

    Per thread: a node runs up to ``concurrency`` tasks at once, each on a thread of its own,
    and Celery sends ``task_postrun`` on the thread that ran the task."""

    def __init__(self, redis: Callable[[], Redis]):
        self._redis = redis  # called when something is sent (the node's store connects lazily)
        self._local = threading.local()

    def add(self, commands: Iterable[Command]) -> None:
        pending: list[Command] = self._pending()
        pending.extend(commands)

    def send(self) -> int:
        """Send what this thread's task queued, in one round trip; how many commands."""
        pending = self._pending()
        if not pending:
            return 0
        self._local.commands = []
        try:
            pipe = self._redis().pipeline(transaction=False)
            for command in pending:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - bookkeeping is never worth a query
            log.warning("could not write %d commands after a query's answer: %s", len(pending), exc)
        return len(pending)

    def _pending(self) -> list[Command]:
        commands: list[Command] | None = getattr(self._local, "commands", None)
        if commands is None:
            commands = self._local.commands = []
        return commands
