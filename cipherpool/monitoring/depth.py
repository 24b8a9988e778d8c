"""How many queries wait in a model's queue: the broker's own count, Redis or RabbitMQ alike.

A passive ``queue_declare`` is the one call both kombu transports answer with a message count
(Redis: the length of the queue's lists, priorities included; RabbitMQ: the queue's ready
messages), and it never creates a queue. A queue nobody declared yet holds nothing: 0.
Messages a node has taken but not acknowledged (the query it computes) are not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery
from redis import Redis

from cipherpool.db.tables import Model
from cipherpool.names import AFFINITY_QUEUE_PREFIX, AFFINITY_QUEUES_KEY, model_queue, query_routing_key

log = logging.getLogger("cipherpool.monitoring")


def queue_depth(app: Celery, queue: str) -> int:
    """Messages ready in ``queue`` (0 if it does not exist)."""
    with app.pool.acquire(block=True) as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception as exc:  # noqa: BLE001 - each transport has its own "no such queue"
            log.debug("queue %s: %s", queue, exc)
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - RabbitMQ closed it already after a 404
                pass


def model_depth(app: Celery, model: Model, registry: Redis | None = None) -> int:
    """Queries waiting for the model's workers: in its dedicated queue and, given the
    platform's Redis (``registry``: where :mod:`cipherpool.affinity_queues` keeps the affinity
    queues nodes consume), in its nodes' key-affinity queues."""
    return sum(queue_depth(app, queue) for queue in model_queues(model.hardware, model.id, known_affinity_queues(registry)))


def known_affinity_queues(registry: Redis | None) -> list[str]:
    if registry is None:
        return []
    return [q.decode() if isinstance(q, bytes) else str(q) for q in registry.hkeys(AFFINITY_QUEUES_KEY)]


def model_queues(host_class: str, model_id: str, affinity_queues: Iterable[str] = ()) -> list[str]:
    """The model's own queue, then those of ``affinity_queues`` that are its nodes'."""
    mine = f"{AFFINITY_QUEUE_PREFIX}{query_routing_key(host_class, model_id)}@"
    return [model_queue(host_class, model_id), *sorted(q for q in affinity_queues if q.startswith(mine))]
