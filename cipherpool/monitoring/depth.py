"""How many queries wait in a model's queue: the broker's own count, Redis or RabbitMQ alike.

A passive ``queue_declare`` is the one call both kombu transports answer with a message count
(Redis: the length of the queue's lists, priorities included; RabbitMQ: the queue's ready
messages), and it never creates a queue. A queue nobody declared yet holds nothing: 0.
Messages a node has taken but not acknowledged (the query it computes) are not counted.
"""

from __future__ import annotations

import logging

from celery import Celery

from cipherpool.db.tables import Model
from cipherpool.names import model_queue

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


def model_depth(app: Celery, model: Model) -> int:
    """Queries waiting for one of the model's workers (its dedicated queue)."""
    return queue_depth(app, model_queue(model.hardware, model.id))
