"""A worker's task events sent a moment after the first of them, together.

Celery's consumer buffers a task's events (``task-received``, ``task-started``,
``task-succeeded``: what Flower's Tasks page shows) and flushes the buffer at its event loop's
next turn, one ``PUBLISH`` built by kombu's producer on the consumer thread per flush. The
first comes from the consumer thread itself; the later two come from the pool thread, which
wakes the consumer for them. So on each query the consumer flushed as the task started
(``task-received``, then ``task-started``: its Python holding the GIL the task's start needs)
and again as the answer was delivered. Measured with ``worker_send_task_events`` off against
on (``benchmarks/path_ab.py``, breast cancer, 800 a side): end to end less compute 7.99
against 8.44 ms, queue wait 2.72 against 3.16 ms, node CPU 9.85 against 11.14 ms a query.

:class:`Consumer` flushes ``event_flush_s`` (``CIPHERPOOL_EVENT_FLUSH_S``) after the first
event it buffers instead: a query's events then go out together (Celery's ``task.multi``
message, which Flower reads), off its start, and the pool thread wakes the consumer once per
flush rather than per event. What is buffered when the worker shuts down is flushed then.
0 keeps Celery's own behaviour.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("cipherpool.workers")
FLUSH_S_KEY = "cipherpool_event_flush_s"  # the app's setting (cipherpool.config.celery)
SHUTDOWN_FLUSH_S = 2.0  # the longest a shutting-down worker waits to send its last events


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no types
    """Celery's consumer, its task events flushed together a moment after the first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flush_s = float(self.app.conf.get(FLUSH_S_KEY) or 0.0)
        self._flush_due = False  # a flush is scheduled: the events sent meanwhile go with it

    def on_send_event_buffered(self) -> None:
        """An event was buffered (from any thread): the flush that takes it, scheduled once."""
        if self._flush_s <= 0 or not self.hub:
            super().on_send_event_buffered()
            return
        if self._flush_due:
            return
        self._flush_due = True
        self.hub.call_soon(self._schedule_flush)  # to the loop's thread (woken if this is another)

    def _schedule_flush(self) -> None:
        self.hub.call_later(self._flush_s, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False  # before the flush: an event buffered during it schedules the next
        self._flush_events()

    def shutdown(self) -> None:
        """Flush what the delay still holds (for at most :data:`SHUTDOWN_FLUSH_S`: a broker cut
        off by a partition would hold the send), then shut down as Celery does."""
        if self._flush_s > 0:
            flusher = threading.Thread(target=self._flush_quietly, name="cipherpool-event-flush", daemon=True)
            flusher.start()
            flusher.join(SHUTDOWN_FLUSH_S)
        super().shutdown()

    def _flush_quietly(self) -> None:
        try:
            self._flush_events()
        except Exception as exc:  # noqa: BLE001 - the broker may be gone: the events with it
            log.warning("task events still buffered at shutdown were not sent: %s", exc)
