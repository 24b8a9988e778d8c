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

Celery's build of a query's message and event cost the gateway 0.7-0.85 ms a query, the
largest single step of its path (docs/performance.md, "Where a query's time goes, traced").
:class:`QueryPublish` builds the same two writes itself, from the same library functions
(kombu's serializers, Celery's clock and node name), in a fraction of that, and proves itself:
the first query of each shape (with or without a placement header) in a process is built both
ways and compared, field by field but those that differ on every publish (the delivery tag, the
milliseconds left to the deadline, the event's clock and time); Celery's writes are the ones
used for it. A shape whose writes differ (another Celery or kombu, another configuration) is
built by Celery from then on, with a warning.

Not where the writes would not mean the same on the platform's Redis: another broker, a broker
on another Redis or database than the store, or keys that kombu prefixes (its
``global_keyprefix`` transport option, applied when kombu's own client sends): there the
publish is Celery's, as before (:func:`fusable`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.serialization import dumps as _serialize
from kombu.utils.json import dumps as _json

from cipherpool.config.settings import Settings
from cipherpool.inflight import InflightQuery

log = logging.getLogger("cipherpool.dispatch")
serialize: Callable[..., tuple[str, str, bytes]] = _serialize  # kombu's registry (untyped)
envelope_json: Callable[[Any], str] = _json  # kombu's JSON, as its Redis channel writes an envelope
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


def comparable(writes: list[Write]) -> list[Write]:
    """``writes`` with what differs on every publish taken out: each envelope's delivery tag and
    the milliseconds its deadline is away (``expiration``), an event's clock and time."""
    out: list[Write] = []
    for name, key, payload, *rest in writes:
        if name not in ("LPUSH", "PUBLISH"):
            out.append((name, key, payload, *rest))
            continue
        envelope = json.loads(payload)
        properties = envelope.get("properties", {})
        properties.pop("delivery_tag", None)
        properties.pop("expiration", None)
        if name == "PUBLISH" and envelope.get("content-type") == "application/json":
            event = json.loads(base64.b64decode(envelope.pop("body")))
            event.pop("clock", None)
            event.pop("timestamp", None)
            envelope["body"] = event
        out.append((name, key, envelope, *rest))
    return out


class QueryPublish:
    """A query's publish as Redis writes, built here; each shape proved once per process
    against Celery's own build (see the module)."""

    def __init__(self, app: Celery):
        self._app = app
        self._proved: dict[bool, str | None] = {}  # shape -> the event's topic, or None: Celery builds
        self._lock = threading.Lock()

    def writes(
        self,
        task_id: str,
        message: InflightQuery,
        kwargsrepr: str,
        headers: dict[str, str],
        celery_writes: Callable[[], list[Write]],
    ) -> list[Write]:
        """The writes that publish ``message`` as Celery would (``celery_writes`` builds them
        with Celery: used for a shape's first query, and for a shape that failed its proof)."""
        shape = bool(headers)
        with self._lock:
            known = shape in self._proved
        if known:
            built = self.built(task_id, message, kwargsrepr, headers)
            return built if built is not None else celery_writes()
        theirs = celery_writes()
        topic = theirs[-1][1] if len(theirs) == 2 and theirs[-1][0] == "PUBLISH" else None
        ours = self.build(task_id, message, kwargsrepr, headers, topic) if topic else []
        proved = bool(topic) and comparable(ours) == comparable(theirs)
        if not proved:
            log.warning(
                "a query's message built here differs from Celery's: Celery builds them (%s)", _first_difference(ours, theirs)
            )
        with self._lock:
            self._proved[shape] = topic if proved else None
        return theirs

    def built(self, task_id: str, message: InflightQuery, kwargsrepr: str, headers: dict[str, str]) -> list[Write] | None:
        """The writes built here, where this shape is proved; None where Celery must build
        them (the shape's first query, or a shape that failed its proof). Makes no I/O."""
        with self._lock:
            topic = self._proved.get(bool(headers))
        return self.build(task_id, message, kwargsrepr, headers, topic) if topic else None

    def proved(self) -> dict[bool, bool]:
        """Each shape met so far (with a placement header or not): built here (True) or by Celery."""
        with self._lock:
            return {shape: topic is not None for shape, topic in self._proved.items()}

    def build(
        self, task_id: str, message: InflightQuery, kwargsrepr: str, headers: dict[str, str], topic: str | None
    ) -> list[Write]:
        """Celery's protocol-2 task message on kombu's Redis transport, and its ``task-sent``
        event on ``topic``, for a query's task (no args, no ETA, no links, priority 0)."""
        origin = anon_nodename()
        expires = datetime.fromtimestamp(message.deadline, tz=UTC).isoformat()
        content_type, encoding, body = serialize(
            ((), message.kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}),
            serializer=self._app.conf.task_serializer,
        )
        task = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": {
                "lang": "py",
                "task": message.task,
                "id": task_id,
                "shadow": message.shadow,
                "eta": None,
                "expires": expires,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "origin": origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
                **headers,
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self._app.thread_oid,
                "kwargsrepr": kwargsrepr,
                "delivery_mode": 2,
                "expiration": str(int(max(0.0, message.deadline - time.time()) * 1000)),
                "delivery_info": {"exchange": "", "routing_key": message.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        fields = {
            "hostname": origin,
            "utcoffset": utcoffset(),
            "pid": os.getpid(),
            "clock": self._app.clock.forward(),
            "uuid": task_id,
            "root_id": task_id,
            "parent_id": None,
            "name": message.shadow,
            "args": "()",
            "kwargs": kwargsrepr,
            "retries": 0,
            "eta": None,
            "expires": expires,
            "queue": message.queue,
            "exchange": "",
            "routing_key": message.queue,
            "timestamp": time.time(),
            "type": "task-sent",
        }
        event = {
            "body": base64.b64encode(envelope_json(fields).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": origin},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return [("LPUSH", message.queue, envelope_json(task)), ("PUBLISH", topic, envelope_json(event))]


_BUILDERS: weakref.WeakKeyDictionary[Celery, QueryPublish] = weakref.WeakKeyDictionary()
_BUILDERS_LOCK = threading.Lock()


def query_publish(app: Celery) -> QueryPublish:
    """The app's builder (one per app, so each process proves its own)."""
    with _BUILDERS_LOCK:
        builder = _BUILDERS.get(app)
        if builder is None:
            builder = _BUILDERS[app] = QueryPublish(app)
        return builder


def _first_difference(ours: list[Write], theirs: list[Write]) -> str:
    """Where two sets of writes first differ, as a path and the two values."""
    a, b = comparable(ours), comparable(theirs)
    if len(a) != len(b):
        return f"{len(a)} writes against {len(b)}"
    return _difference(a, b, "") or "none"


def _difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if a == b else f"{path or 'value'}: {str(a)[:80]!r} here, {str(b)[:80]!r} by Celery"
