"""Key-affinity queues on the broker, and what keeps a query from being stranded in one.

A query routed by key set (:mod:`cipherpool.affinity`) goes to one node's queue of its model,
``cipherpool.affinity.<class>.<model>@<node>``, bound beside the model's own queue on the
query exchange. Only that node consumes it, so a query left there when the node stops taking
it would wait until its deadline: on a Redis broker nothing moves a message between queues,
and beat's redelivery (:mod:`cipherpool.scheduler.redeliver`) rightly leaves alone a query that
is still in a queue. Three things move such queries to the model's own queue, where any of its
workers takes them, under the same id and with the same deadline (Celery's own
:func:`celery.contrib.migrate.republish`: body, headers and properties as they were):

* the node itself, when it stops consuming (unbind, standby): :func:`move`, right after it
  cancelled its consumer;
* beat, every reconcile (:func:`rescue`), for each affinity queue whose (model, node) has no
  worker up on an online node: a node that died, was cut off or lost its row never drains its
  own queue. A query a dead node held unacknowledged comes back to its affinity queue (RabbitMQ
  when the connection closes, kombu's Redis transport after the visibility timeout) and is
  moved by a later run; so a queue is watched until well past both;
* a node handed a query of a model it no longer serves puts it back (Celery's requeue) and
  beat's next run moves it.

Which affinity queues exist is kept in the platform's Redis (``cipherpool:affinity-queues``:
the queue and when a node was last seen consuming it), written by the node when it starts
consuming and by beat while the worker is up: a look at a known list, never a scan of the
broker's keys. Moving is at least once: a mover that dies between publishing a query and
acknowledging it leaves a copy behind, which runs twice at worst, to the same answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis
from celery import Celery
from celery.contrib.migrate import republish
from kombu.entity import Queue
from kombu.messaging import Producer
from sqlmodel import Session, select

from cipherpool.db.tables import Model, PoolNode, Worker, WorkerStatus
from cipherpool.dispatch import QUERIES
from cipherpool.monitoring.depth import queue_depth
from cipherpool.names import AFFINITY_QUEUE_PREFIX, AFFINITY_QUEUES_KEY, affinity_queue, model_queue_of_affinity
from cipherpool.statuses import NodeStatus

log = logging.getLogger("cipherpool.affinity")
MOVE_MOST = 10_000  # messages one look moves from one queue (the rest wait for the next run)
# Transport bookkeeping a republished message must not carry over (kombu sets its own).
DROPPED_PROPERTIES = ["application_headers", "content_type", "content_encoding", "headers", "delivery_info", "delivery_tag"]


def register(client: redis.Redis, queue: str, now: float | None = None) -> None:
    """The node consumes ``queue`` now (beat watches it from then on)."""
    client.hset(AFFINITY_QUEUES_KEY, queue, repr(time.time() if now is None else now))


def registered(client: redis.Redis) -> dict[str, float]:
    """Every affinity queue a node consumed, and when a node was last seen consuming it."""
    return {_text(q): float(t) for q, t in client.hgetall(AFFINITY_QUEUES_KEY).items()}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def move(app: Celery, queue: str, most: int = MOVE_MOST) -> int:
    """Move the queries waiting in affinity ``queue`` to their model's own queue, each under
    its id, headers (deadline included) and properties; how many moved. Nothing to move (or no
    such queue): 0, without creating it."""
    target = model_queue_of_affinity(queue)
    if target is None or queue_depth(app, queue) == 0:
        return 0
    model_name, routing_key = target
    moved = 0
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            producer = Producer(channel, exchange=QUERIES)  # type: ignore[no-untyped-call]
            Queue(model_name, QUERIES, routing_key=routing_key)(channel).declare()  # type: ignore[no-untyped-call]  # its binding may not exist yet
            from_queue = Queue(queue, QUERIES, routing_key=queue[len(AFFINITY_QUEUE_PREFIX) :])(channel)  # type: ignore[no-untyped-call]
            while moved < most:
                message = from_queue.get(no_ack=False)  # type: ignore[no-untyped-call]
                if message is None:
                    break
                republish(producer, message, exchange=QUERIES.name, routing_key=routing_key, remove_props=DROPPED_PROPERTIES)
                message.ack()
                moved += 1
        finally:
            channel.close()
    if moved:
        log.warning("moved %d queries from %s (its node no longer takes them) to %s", moved, queue, model_name)
    return moved


@dataclass
class RescueReport:
    moved: dict[str, int] = field(default_factory=dict)  # affinity queue -> queries moved to the model's queue
    forgotten: list[str] = field(default_factory=list)  # queues no longer watched


def consumed(session: Session) -> set[str]:
    """The affinity queues a node consumes now: one per worker up on an online node."""
    rows = session.exec(
        select(Model.hardware, Worker.model_id, Worker.node_name)
        .join(Model, Model.id == Worker.model_id)  # type: ignore[arg-type]
        .join(PoolNode, PoolNode.name == Worker.node_name)  # type: ignore[arg-type]
        .where(Worker.status == WorkerStatus.UP, PoolNode.status == NodeStatus.ONLINE)
    ).all()
    return {affinity_queue(host_class, model_id, node) for host_class, model_id, node in rows}


def rescue(client: redis.Redis, app: Celery, serving: set[str], watch_s: float, now: float | None = None) -> RescueReport:
    """Beat's look: the queries in each known affinity queue that no node consumes
    (``serving``: :func:`consumed`) move to their model's queue; a queue consumed is marked
    seen; one unconsumed, empty and unseen for ``watch_s`` (past the visibility timeout and
    the query deadline: nothing can come back to it) is no longer watched."""
    now = time.time() if now is None else now
    report = RescueReport()
    known = registered(client)
    if seen_now := [q for q in known if q in serving]:
        client.hset(AFFINITY_QUEUES_KEY, mapping={q: repr(now) for q in seen_now})
    for queue, seen in known.items():
        if queue in serving:
            continue
        moved = move(app, queue)
        if moved:
            report.moved[queue] = moved
        elif now - seen > watch_s:
            client.hdel(AFFINITY_QUEUES_KEY, queue)
            report.forgotten.append(queue)
    return report
