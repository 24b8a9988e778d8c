"""A Celery publish turned into the Redis writes it would make, so that they are made elsewhere.

Publishing a query cost the gateway two more round trips after its admission script (which
counts the query and records it, :func:`cipherpool.services.usage.charge`): kombu's LPUSH of
the task message, then the PUBLISH of its ``task-sent`` event. Where the broker is the
platform's own Redis (one URL for both), those two writes are made inside the admission script
instead, among its ``then`` writes: the query is counted, recorded and queued in one atomic
round trip, or none of it is (a query over its quota is never queued, and nothing is left to
give back when Redis refuses).

The writes are Celery's and kombu's own, not rebuilt here: Celery builds the task message and
its event as it always does, and kombu's Redis channel routes each one and, given a publish
batch (kombu's batch publishing: ``Producer.batch``), hands the batch each final command
(``add``) instead of sending it. :class:`Collected` is such a batch that keeps the commands.
It is installed as the producer's current batch for one send, in the calling thread only.

Not where the writes would not mean the same on the platform's Redis: another broker, a broker
on another Redis or database than the store, or keys that kombu prefixes (its
``global_keyprefix`` transport option, applied when kombu's own client sends): there the
publish is Celery's, as before (:func:`fusable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from cipherpool.config.settings import Settings

Write = tuple[Any, ...]  # a Redis command and its arguments, as cipherpool.services.usage takes them


class Collected:
    """A kombu publish batch that keeps the Redis commands of what is published through it."""

    def __init__(self) -> None:
        self.writes: list[Write] = []

    def publish(self, channel: Any, message: dict[str, Any], **kwargs: Any) -> Any:
        """What kombu's producer calls with a batch current (its ``_ProducerBatchState``'s part)."""
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        """What kombu's Redis channel calls with each final command (``lpush``, ``publish``,
        ``pexpire``) in place of sending it."""
        self.writes.append((name.upper(), *args))


def fusable(settings: Settings, app: Celery) -> bool:
    """May a publish be made as writes on the platform's Redis (``settings.store_url``'s)?"""
    broker = settings.effective_broker_url()
    options = app.conf.broker_transport_options or {}
    return (
        settings.broker_is_redis()
        and broker.startswith(("redis://", "rediss://"))
        and ";" not in broker  # failover URLs: kombu picks the one it reaches
        and settings.effective_store_url() == broker
        and not options.get("global_keyprefix")
    )


def writes_of(app: Celery, send: Callable[[Any], object]) -> list[Write]:
    """The Redis writes ``send(producer)`` would make, none of them made: ``send`` publishes
    with the producer it is given (Celery's ``send_task(..., producer=producer)``)."""
    collected = Collected()
    with app.producer_or_acquire() as producer:
        local = producer._batch_local  # kombu's: the batch its publishes go to, per thread
        before = getattr(local, "current", None)
        local.current = collected
        try:
            send(producer)
        finally:
            if before is None:
                del local.current
            else:
                local.current = before
    if not collected.writes:
        raise RuntimeError("the publish made no Redis write to collect (not a Redis channel?)")
    return collected.writes
