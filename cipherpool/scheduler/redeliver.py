"""Beat's redelivery: send again the queries a Redis broker lost between Redis and a node.

Run with the reconciler, every ``CIPHERPOOL_RECONCILE_INTERVAL_S``, on a Redis broker only
(:mod:`cipherpool.inflight` says why RabbitMQ never needs it). For each recorded query
published more than ``redelivery_grace_s`` ago:

1. started (its result key exists) or past its deadline: its record is forgotten;
2. else it is looked for, by its id, in its queue (every priority list of it; for a node's
   key-affinity queue, its model's queue too) and in the messages nodes hold unacknowledged
   (kombu's ``unacked`` hash), in one server-side script;
3. found: any earlier "missing" mark is cleared. Not found: marked missing the first time;
   missing again ``redelivery_grace_s`` or more later, it is sent again under the same id, with
   its first deadline, to its model's own queue, at most ``redelivery_max`` times.

Two looks apart, not one: between a node's ``BRPOP`` and kombu's record of the message as
unacknowledged, a message is in neither place for an instant, and the look itself is not atomic
(the unacked hash is read first, then the queues, in pages: a message only moves from a queue
to the hash, or back when kombu restores it, so a second look finds it). A node that took the
message and was cut off before it could say so may still run it after the network heals, so
the query may run twice; both answers are the same value under the same key, and the client
reads one. One run at a time (a lock in Redis): two overlapping runs could send a query twice.
The look reads every message of the queues concerned, once per run, only while some query is
older than the grace, in pages that never hold Redis up: cheap for ciphertexts of kilobytes
(1,000 queued digits queries are about 2 MB); with deep queues of large ciphertexts, lower
``inline_max_bytes`` so that they travel by reference and the messages stay small.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace

import redis
from celery import Celery

from cipherpool import inflight
from cipherpool.context import PlatformContext
from cipherpool.dispatch import republish_query
from cipherpool.names import RESULT_META_PREFIX, model_queue_of_affinity

log = logging.getLogger("cipherpool.redeliver")
PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: a queue's list for priority n is "<queue>\x06\x16<n>"
PRIORITY_STEPS = (3, 6, 9)  # kombu's default steps above 0 (0 is the queue's own name)
UNACKED_KEY = "unacked"  # kombu's Redis transport: hash {delivery tag: [message, exchange, routing key]}
BATCH = 1000

# Every message's id, read where the transport keeps it: Celery's protocol 2 puts the task id in
# the headers as "id" (root_id, parent_id and correlation_id do not match the pattern).
MESSAGE_ID = re.compile(rb'"id": ?"([^"]+)"')
PAGE = 200  # messages read per round trip
LOCK_KEY = "cipherpool:redeliver:lock"


@dataclass
class RedeliveryReport:
    started: int = 0  # records forgotten: the query started (or ended)
    expired: int = 0  # records forgotten: past the query's deadline
    missing: int = 0  # found nowhere for the first time
    sent: list[str] = field(default_factory=list)  # sent again
    given_up: int = 0  # missing again after redelivery_max redeliveries


def redeliver(ctx: PlatformContext, app: Celery, now: float | None = None) -> RedeliveryReport:
    s, report = ctx.settings, RedeliveryReport()
    if not s.broker_is_redis() or s.redelivery_grace_s <= 0:
        return report
    now = time.time() if now is None else now
    records = ctx.store.redis
    token = uuid.uuid4().hex
    if not records.set(LOCK_KEY, token, nx=True, ex=max(60, int(s.redelivery_grace_s * 6))):
        log.info("redelivery: another run holds the lock; this one stands down")
        return report
    try:
        _redeliver(ctx, app, now, report)
    finally:
        inflight.release(records, LOCK_KEY, token)
    return report


def _redeliver(ctx: PlatformContext, app: Celery, now: float, report: RedeliveryReport) -> None:
    s, records = ctx.settings, ctx.store.redis
    candidates: list[inflight.Record] = []
    for due in inflight.pages_older_than(records, now - s.redelivery_grace_s, BATCH):
        started = _started(ctx.result_redis, due)
        report.started += len(started)
        inflight.forget(records, *started)
        waiting = [q for q in due if q not in started]
        loaded = inflight.load(records, waiting) if waiting else {}
        expired = [q for q, r in loaded.items() if r is None or r.message.deadline <= now]
        report.expired += len(expired)
        inflight.forget(records, *expired)
        candidates += [r for r in loaded.values() if r is not None and r.message.deadline > now]
    if not candidates:
        return
    present = find(ctx.broker_redis, [r.query_id for r in candidates], {q for r in candidates for q in _queues(r.message)})
    for rec in candidates:
        if rec.query_id in present:
            if rec.missing_since is not None:
                inflight.mark_found(records, rec.query_id)
        elif rec.missing_since is None:
            inflight.mark_missing(records, rec.query_id, now)
            report.missing += 1
        elif now - rec.missing_since >= s.redelivery_grace_s:
            _send_again(app, records, rec, s.redelivery_max, report)


def _send_again(app: Celery, records: redis.Redis, rec: inflight.Record, most: int, report: RedeliveryReport) -> None:
    if rec.sent >= most:
        log.error("query %s: lost again after %d redeliveries; its client will get query_timeout", rec.query_id, rec.sent)
        inflight.forget(records, rec.query_id)
        report.given_up += 1
        return
    message = _to_model_queue(rec.message)
    republish_query(app, rec.query_id, message)
    inflight.mark_sent(records, rec.query_id)
    report.sent.append(rec.query_id)
    log.warning(
        "query %s was in no queue, in no node's hands and not started: sent again to %s (%d of %d)",
        rec.query_id,
        message.queue,
        rec.sent + 1,
        most,
    )


def _queues(message: inflight.InflightQuery) -> tuple[str, ...]:
    """Where a recorded query may wait: the queue it was sent to and, for a node's affinity
    queue, its model's queue too (where beat or its node moves it: cipherpool.affinity_queues)."""
    model = model_queue_of_affinity(message.queue)
    return (message.queue,) if model is None else (message.queue, model[0])


def _to_model_queue(message: inflight.InflightQuery) -> inflight.InflightQuery:
    """A lost query is sent again to its model's own queue: its affinity queue's node may be
    the reason it was lost."""
    model = model_queue_of_affinity(message.queue)
    return message if model is None else replace(message, queue=model[0], routing_key=model[1])


def _started(results: redis.Redis, query_ids: list[str]) -> set[str]:
    """The queries with a result key: started (``task_track_started``), or ended."""
    pipe = results.pipeline(transaction=False)
    for query_id in query_ids:
        pipe.exists(RESULT_META_PREFIX + query_id)
    return {q for q, there in zip(query_ids, pipe.execute(), strict=True) if there}


def find(broker: redis.Redis, query_ids: list[str], queues: set[str]) -> set[str]:
    """Which of ``query_ids`` are in one of ``queues`` or held unacknowledged by a node: the
    unacked hash first, then each queue's lists, a page at a time (Redis is never held up)."""
    wanted, found = {q.encode() for q in query_ids}, set[bytes]()

    def look(messages: list[bytes | str]) -> None:
        for message in messages:
            raw = message.encode() if isinstance(message, str) else message
            found.update(m for m in MESSAGE_ID.findall(raw) if m in wanted)

    for _field, value in broker.hscan_iter(UNACKED_KEY, count=PAGE):
        look([value])
    for key in [k for q in sorted(queues) for k in (q, *(f"{q}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS))]:
        start = 0
        while True:
            page = broker.lrange(key, start, start + PAGE - 1)
            look(page)
            if len(page) < PAGE:
                break
            start += PAGE
    return {f.decode() for f in found}
