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

:class:`Consumer` flushes from a timer of its event loop instead, every ``event_flush_s``
(``CIPHERPOOL_EVENT_FLUSH_S``), once the oldest buffered event is that old: a query's events
go out together (Celery's ``task.multi`` message, which Flower reads), off its start, and
nothing wakes the consumer for an event. The timer is registered with the loop on every
connection, as Celery's own are (and cancelled with them on a reconnect), so no flush can be
lost with a callback; what is buffered when the connection drops is kept for the next one
(Celery keeps only its unbuffered events); what is buffered at shutdown is sent then, its
sockets bounded by :data:`SHUTDOWN_FLUSH_S`. 0 keeps Celery's own behaviour.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.utils.threads import bound_open_broker_sockets
from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("cipherpool.workers")
FLUSH_S_KEY = "cipherpool_event_flush_s"  # the app's setting (cipherpool.config.celery)
SHUTDOWN_FLUSH_S = 2.0  # the longest a shutting-down worker's sockets wait to send its last events


def oldest_buffered(dispatcher: Any) -> float | None:
    """When the oldest event a dispatcher holds in its group buffers was made (None: none)."""
    stamps = [events[0].get("timestamp", 0.0) for events in dispatcher._group_buffer.values() if events]
    return min(stamps) if stamps else None


def keep_buffered(dispatcher: Any) -> int:
    """Move what a dispatcher holds in its group buffers to its outbound buffer, which Celery
    hands to the next connection's dispatcher (each group as one ``<group>.multi`` message, as
    a flush sends it): how many events were kept."""
    kept = 0
    with dispatcher.mutex:
        for group, events in dispatcher._group_buffer.items():
            if events:
                dispatcher._outbound_buffer.append((list(events), f"{group}.multi"))
                kept += len(events)
                del events[:]
    return kept


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no types
    """Celery's consumer, its task events flushed together a moment after the first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flush_s = float(self.app.conf.get(FLUSH_S_KEY) or 0.0)

    def on_send_event_buffered(self) -> None:
        """An event was buffered (from any thread): the loop's timer flushes it (Celery's own
        flush at the loop's next turn where the delay is 0)."""
        if self._flush_s <= 0:
            super().on_send_event_buffered()

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        if self._flush_s > 0:
            hub.call_repeatedly(self._flush_s, self._flush_due)

    def _flush_due(self) -> None:
        dispatcher = self.event_dispatcher
        oldest = oldest_buffered(dispatcher) if dispatcher is not None else None
        if oldest is not None and time.time() - oldest >= self._flush_s:
            self._flush_events()

    def on_close(self) -> None:
        """The connection is lost: what the delay holds goes to the next connection."""
        super().on_close()
        if self.event_dispatcher is not None:
            keep_buffered(self.event_dispatcher)

    def shutdown(self) -> None:
        """Send what the delay still holds, its sockets bounded, then shut down as Celery does."""
        dispatcher = self.event_dispatcher
        if self._flush_s > 0 and dispatcher is not None and _holds(dispatcher):
            bound_open_broker_sockets(dispatcher.connection, SHUTDOWN_FLUSH_S)
            try:
                self._flush_events()
            except Exception as exc:  # noqa: BLE001 - the broker may be gone: the events with it
                log.warning("task events still buffered at shutdown were not sent: %s", exc)
            if _holds(dispatcher):
                log.warning("task events still buffered at shutdown were not sent (the broker did not take them)")
        super().shutdown()


def _holds(dispatcher: Any) -> bool:
    """Whether a dispatcher holds events: in its group buffers, or moved to its outbound
    buffer (by :func:`keep_buffered`: Celery's blueprint closes the consumer, and so calls
    :meth:`Consumer.on_close`, before it shuts it down)."""
    return oldest_buffered(dispatcher) is not None or bool(dispatcher._outbound_buffer)
