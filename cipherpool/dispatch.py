"""Putting work on the broker: queries onto their model's queue, commands onto a node's queue.

Shared by the gateway and by trusted in-cluster code (:mod:`cipherpool.tasks.submit`), so a
query is built and published one way only. Whoever calls :func:`prepare_query` has already
authorised it; what goes on the wire carries ids, never a credential.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.entity import Exchange, Queue
from kombu.exceptions import OperationalError

from cipherpool import inflight
from cipherpool.affinity import Choice
from cipherpool.config.settings import Settings
from cipherpool.errors import BrokerUnavailable, InvalidInput, QueryTimeout, QuotaExceeded, RemoteError, StoreFull
from cipherpool.fhe.values import check_ciphertext
from cipherpool.inflight import InflightQuery
from cipherpool.messages import ITEM, EncryptedInput, QueryReply, QueryRequest, redacted_kwargs, unpack_batch, unwrap
from cipherpool.monitoring import timings
from cipherpool.names import (
    QUERY_BATCH_TASK,
    QUERY_EXCHANGE,
    QUERY_TASK,
    WARM_TASK,
    affinity_queue,
    affinity_routing_key,
    model_queue,
    node_queue,
    query_routing_key,
    shared_queue,
    shared_routing_key,
)
from cipherpool.outages import REDIS_FULL, redis_full
from cipherpool.publishwrites import Write, fusable, query_publish, writes_of
from cipherpool.services import keyuse, usage
from cipherpool.services.queries import ModelGrant, Route, TokenGrant, check_query
from cipherpool.store import BlobStore

log = logging.getLogger("cipherpool.dispatch")


def open_envelope(
    grant: TokenGrant,
    ciphertext: bytes,
    wait_for_worker: bool = False,
    mode: Route = Route.AUTO,
    *,
    noted: Callable[[ModelGrant], None] | None = None,
) -> tuple[EncryptedInput, ModelGrant]:
    """The ciphertext's envelope, checked against what the grant may query, and its model.
    ``noted`` hears the model as soon as the envelope names one of the grant's, before the
    checks (the gateway counts a refusal for it)."""
    envelope = EncryptedInput.decode(ciphertext)
    if noted is not None and (named := grant.find(envelope.model_id)) is not None:
        noted(named)
    return envelope, check_query(grant, envelope.model_id, wait_for_worker, mode)


def admit_ciphertext(store: BlobStore, model: ModelGrant, envelope: EncryptedInput) -> None:
    """Refuse, before anything is counted or published, a ciphertext that no node could
    evaluate (:func:`cipherpool.fhe.values.check_ciphertext`): ``malformed_ciphertext`` or
    ``invalid_ciphertext``. The refusal is counted with the model's refusals (best effort),
    so its provider sees it, apart from its error rate."""
    try:
        check_ciphertext(envelope.data)
    except InvalidInput:
        try:
            timings.count_refused(store.redis, model.model_id, version=model.version)
        except Exception:  # noqa: BLE001 - a figure is never worth the caller's answer
            log.warning("could not count a refused ciphertext for model %s", model.model_id)
        raise


def prepare_query(
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    *,
    record_use: bool = True,
) -> QueryRequest:
    """An authorised query: inline when small, else by reference through the store. The key
    set's use is recorded (throttled, in Redis: :mod:`cipherpool.services.keyuse`), for a
    query as for a warm-up: a key set unused too long expires (``record_use`` False: the
    caller records it, once the query is counted)."""
    if record_use:
        keyuse.record(store.redis, grant.token_id, envelope.key_id)
    inline = len(ciphertext) <= settings.inline_max_bytes
    return QueryRequest(
        token_id=grant.token_id,
        model_id=envelope.model_id,
        version=model.version,
        account_id=grant.account_id,
        key_id=envelope.key_id,
        blob_id=blob_id,
        input=ciphertext if inline else None,
        input_ref=None if inline else store.put_payload(ciphertext, settings.payload_ttl_s),
        submitted_at=time.time(),
    )


QUERIES = Exchange(QUERY_EXCHANGE, type="direct")  # type: ignore[no-untyped-call]


def submit(
    app: Celery,
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    *,
    shared: bool,
    task_id: str | None = None,
    before_publish: Callable[[], None] | None = None,
    routed: Choice | None = None,
    records: Sequence[usage.Write] = (),
) -> AsyncResult:
    """The submit sequence, the same at the gateway and for trusted in-cluster code: count the
    query against the token's quota, prepare it, publish it; a query that was not published
    is given back to the quota (the client's retry must not count twice). ``before_publish``
    runs after the query is prepared and before it is sent; ``records``: writes made with the
    query's count (the gateway records the query's owner so). A ciphertext no node could
    evaluate is refused first, uncounted. On a Redis broker the message is kept until a node
    starts it (:mod:`cipherpool.inflight`). ``routed``: the node its key set is routed to
    (:mod:`cipherpool.affinity`); None, any of the model's.

    An inline query (the usual one) is counted, its ``records`` written and its in-flight copy
    kept in one round trip (:func:`cipherpool.services.usage.charge`'s ``then``); a query sent
    by reference is counted before its ciphertext is stored, so that a token at its quota
    stores nothing."""
    admit_ciphertext(store, model, envelope)
    if len(ciphertext) > settings.inline_max_bytes:
        usage.charge(store.redis, grant.token_id, grant.quota, then=records)
        return _prepare_and_publish(
            app,
            settings,
            store,
            grant,
            model,
            envelope,
            ciphertext,
            blob_id,
            QUERY_TASK,
            1,
            shared,
            task_id,
            before_publish,
            routed,
        )
    task_id = task_id or str(uuid.uuid4())
    message, placement, keep, kept = _inline(
        settings, store, grant, model, envelope, ciphertext, blob_id, shared, task_id, routed
    )
    # On the platform's own Redis, the publish itself is among the script's writes: counted,
    # recorded and queued in one round trip (cipherpool.publishwrites).
    sent = _publish_writes(app, task_id, message, placement) if before_publish is None and fusable(settings, app) else []
    usage.charge(store.redis, grant.token_id, grant.quota, then=[*records, *kept, *sent])
    if sent:
        keyuse.record(store.redis, grant.token_id, envelope.key_id)
        return app.AsyncResult(task_id)
    try:
        keyuse.record(store.redis, grant.token_id, envelope.key_id)  # a use of a query counted, as before
        if before_publish is not None:
            before_publish()
        return _send_query(app, task_id, message, placement)
    except Exception:
        if keep is not None:
            inflight.forget_quietly(keep, task_id)  # never sent: never to be sent again
        _refund(store, grant)
        raise


def fused_submit(
    app: Celery,
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    *,
    shared: bool,
    task_id: str,
    routed: Choice | None,
    records: Sequence[usage.Write] = (),
) -> list[usage.Write] | None:
    """:func:`submit`'s writes for an inline query on the platform's own Redis, built with no
    I/O, for the gateway's event loop: the caller makes them with the count
    (:func:`~cipherpool.services.usage.charge_async`), then records the key set's use
    (:func:`~cipherpool.services.keyuse.record`, when due). None where that is not so: a
    ciphertext sent by reference, another broker, a message Celery must build first (its
    shape's first in this process), a ciphertext :func:`admit_ciphertext` refuses (and counts):
    then :func:`submit` does it all."""
    publish = query_publish(app)
    if len(ciphertext) > settings.inline_max_bytes or not fusable(settings, app) or not any(publish.proved().values()):
        return None  # (no shape proved yet, or none could be: Celery builds, in submit)
    try:
        check_ciphertext(envelope.data)
    except InvalidInput:
        return None
    message, placement, _keep, kept = _inline(
        settings, store, grant, model, envelope, ciphertext, blob_id, shared, task_id, routed
    )
    sent = publish.built(task_id, message, redacted_kwargs(message.kwargs), _publish_headers(placement))
    return None if sent is None else [*records, *kept, *sent]


def _inline(
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    shared: bool,
    task_id: str,
    routed: Choice | None,
) -> tuple[InflightQuery, str | None, redis.Redis | None, list[usage.Write]]:
    """An inline query's message, its placement, and its in-flight copy's writes (with the
    client that keeps it, or none)."""
    request = prepare_query(settings, store, grant, model, envelope, ciphertext, blob_id, record_use=False)
    message, placement = query_message(
        request, model.hardware, settings.query_timeout_s, shared, model_name=model.name, routed=routed
    )
    keep = keeper(settings, store)
    return message, placement, keep, inflight.writes(task_id, message) if keep is not None else []


def _prepare_and_publish(
    app: Celery,
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    task: str,
    runs: int,
    shared: bool,
    task_id: str | None,
    before_publish: Callable[[], None] | None,
    routed: Choice | None = None,
) -> AsyncResult:
    """The rest of the submit sequence, for a query and a batch alike, once its ``runs`` are
    counted: prepare, let the caller record what it must, publish; the runs go back to the quota
    if it was not published (the client's retry must not count twice)."""
    try:
        request = prepare_query(settings, store, grant, model, envelope, ciphertext, blob_id)
        if before_publish is not None:
            before_publish()
        return publish_query(
            app,
            request,
            model.hardware,
            settings.query_timeout_s,
            task_id=task_id,
            shared=shared,
            model_name=model.name,
            keep=keeper(settings, store),
            task=task,
            routed=routed,
        )
    except Exception:
        _refund(store, grant, runs)
        raise


def keeper(settings: Settings, store: BlobStore) -> redis.Redis | None:
    """Where a published query is kept until a node starts it (:mod:`cipherpool.inflight`): the
    platform's Redis on a Redis broker with redelivery on; nowhere on RabbitMQ."""
    return store.redis if settings.broker_is_redis() and settings.redelivery_grace_s > 0 else None


def send_warmups(
    app: Celery,
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    ciphertext: bytes,
    blob_id: str,
    nodes: list[str],
) -> list[AsyncResult]:
    """A key warm-up, its ciphertext admitted (:func:`admit_ciphertext`): one throwaway
    evaluation sent to each of ``nodes`` (dedicated nodes serving the model), each counted
    against the token's quota as a query (as many nodes as the quota has room for;
    ``QuotaExceeded`` when it has none). A warm-up that was not published is given back. Each
    carries a deadline: one a node could not start in time is dropped, never run late."""
    granted = usage.charge_runs(store.redis, grant.token_id, grant.quota, len(nodes))
    if not granted:  # no node serves it: nothing to send (a token at its quota was refused all the same)
        return []
    sent: list[AsyncResult] = []
    try:
        request = prepare_query(settings, store, grant, model, envelope, ciphertext, blob_id).encode()
        for node in nodes[:granted]:
            sent.append(send_to_node(app, node, WARM_TASK, expires=settings.key_warmup_timeout_s, request=request))
    finally:
        if len(sent) < granted:
            _refund(store, grant, granted - len(sent))
    return sent


def _refund(store: BlobStore, grant: TokenGrant, runs: int = 1) -> None:
    try:
        usage.refund(store.redis, grant.token_id, runs)
    except Exception:  # noqa: BLE001 - the store is what failed; the original error is the answer
        log.warning("could not give back a query of token %s to its quota", grant.token_id)


def query_queue(host_class: str, model_id: str) -> Queue:
    """A model's query queue as nodes of ``host_class`` consume it: bound to the query exchange
    under the routing key of that class and model. The publisher declares it too, so a query
    sent before any node binds (a caller who waits for a worker) waits in it."""
    return Queue(
        model_queue(host_class, model_id),
        QUERIES,  # type: ignore[no-untyped-call]
        routing_key=query_routing_key(host_class, model_id),
    )


def affinity_queue_of(host_class: str, model_id: str, node: str) -> Queue:
    """One node's queue of a model's queries, for the key sets routed to it
    (:mod:`cipherpool.affinity`), bound beside the model's own queue; consumed by that node
    only, while it serves the model (:mod:`cipherpool.affinity_queues`)."""
    return Queue(
        affinity_queue(host_class, model_id, node),
        QUERIES,  # type: ignore[no-untyped-call]
        routing_key=affinity_routing_key(host_class, model_id, node),
    )


def shared_queue_of(host_class: str) -> Queue:
    """The queue every shared node of ``host_class`` consumes: queries of models that allow
    shared nodes, loaded on demand."""
    return Queue(shared_queue(host_class), QUERIES, routing_key=shared_routing_key(host_class))  # type: ignore[no-untyped-call]


QUERY_TASK_PREFIX = "cipherpool.query"  # what every query's shadow name begins with
QUERY_SHADOW_ID_CHARS = 8  # characters of the model id in a query's shadow name


def query_shadow(model_name: str, model_id: str) -> str:
    """The name a query shows under in node logs, task events and Flower:
    ``cipherpool.query[<model name>:<first 8 characters of its id>]``.

    Celery's ``shadow`` renames a task for monitoring only: the node still looks the task up
    by its real name (the message's ``task`` header), so Flower's task list and its
    ``flower_task_runtime_seconds`` tell models apart. Model names are unique per account
    only; the id's prefix tells two accounts' ``digits`` apart and stays the same across
    versions, while the name keeps it readable. The account's name is left out: the query's
    grant does not carry it, and it would put a tenant's name in every log line."""
    return f"{QUERY_TASK_PREFIX}[{model_name}:{model_id[:QUERY_SHADOW_ID_CHARS]}]"


def publish_query(
    app: Celery,
    request: QueryRequest,
    host_class: str,
    expires_s: float,
    task_id: str | None = None,
    shared: bool = False,
    *,
    model_name: str,
    keep: redis.Redis | None = None,
    task: str = QUERY_TASK,
    routed: Choice | None = None,
) -> AsyncResult:
    """Publish with the routing key of the model's host class (its dedicated workers', or the
    shared nodes' of the class), with a deadline: a node discards it once nobody waits. Only
    nodes of that class have a queue bound to that key. ``model_name`` names it in monitoring
    (:func:`query_shadow`), on dedicated and shared nodes alike. ``keep``: record the message
    there first, for beat to send again should the broker lose it (:mod:`cipherpool.inflight`).
    ``task``: the query task, or the batch task (a batch is one message, one record, one shadow
    name: a node forgets the record when it starts the batch, and beat sends it again as a batch).
    ``routed``: to that node's affinity queue of the model (:func:`affinity_queue_of`), not the
    model's own (never for a shared node's query), with a header saying whether the node is the
    key set's home or the next in rank (:data:`PLACEMENT_HEADER`)."""
    task_id = task_id or str(uuid.uuid4())
    message, placement = query_message(request, host_class, expires_s, shared, model_name=model_name, task=task, routed=routed)
    if keep is not None:
        inflight.record(keep, task_id, message)
    try:
        return _send_query(app, task_id, message, placement)
    except Exception:
        if keep is not None:
            inflight.forget_quietly(keep, task_id)  # never sent: never to be sent again
        raise


def query_message(
    request: QueryRequest,
    host_class: str,
    expires_s: float,
    shared: bool,
    *,
    model_name: str,
    task: str = QUERY_TASK,
    routed: Choice | None = None,
) -> tuple[InflightQuery, str | None]:
    """What :func:`publish_query` sends (and keeps): the task, its queue and its deadline; and
    its placement header (:data:`PLACEMENT_HEADER`), for a routed query."""
    if shared:
        queue = shared_queue_of(host_class)
    elif routed is not None and routed.node is not None:
        queue = affinity_queue_of(host_class, request.model_id, routed.node)
    else:
        queue = query_queue(host_class, request.model_id)
    message = InflightQuery(
        task,
        {"request": request.encode()},
        queue.name,
        queue.routing_key,
        query_shadow(model_name, request.model_id),
        time.time() + expires_s,
    )
    placement = None if routed is None or routed.node is None or shared else ("next" if routed.fallback else "home")
    return message, placement


def republish_query(app: Celery, query_id: str, message: InflightQuery) -> AsyncResult:
    """Send a recorded query again, under its id, to its queue, with its first deadline."""
    return _send_query(app, query_id, message)


PLACEMENT_HEADER = "cipherpool_placement"  # a routed query's node: "home" (its key set's) or "next" (the next in rank)


def _publish_writes(app: Celery, task_id: str, message: InflightQuery, placement: str | None) -> list[Write]:
    """The Redis writes that publish a query's message and its event (:mod:`cipherpool.publishwrites`)."""

    def celery_writes() -> list[Write]:
        try:
            return writes_of(app, lambda producer: _send_query(app, task_id, message, placement, producer=producer))
        except OperationalError as exc:  # the producer's connection, made at its first use
            raise BrokerUnavailable(f"Cannot reach the broker: {exc}") from None

    return query_publish(app).writes(
        task_id, message, redacted_kwargs(message.kwargs), _publish_headers(placement), celery_writes
    )


def _publish_headers(placement: str | None) -> dict[str, str]:
    return {PLACEMENT_HEADER: placement} if placement else {}


def _send_query(
    app: Celery, task_id: str, message: InflightQuery, placement: str | None = None, producer: Any = None
) -> AsyncResult:
    """Publish a query's message. ``placement``: a message header (:data:`PLACEMENT_HEADER`)
    a node reads as ``task.request.cipherpool_placement`` to count a spill past the bound as
    the fallback it is (older nodes ignore it). ``producer``: the one to publish with (else
    one from Celery's pool)."""
    return _send(
        app,
        message.task,
        message.kwargs,
        Queue(message.queue, QUERIES, routing_key=message.routing_key),  # type: ignore[no-untyped-call]
        expires=datetime.fromtimestamp(message.deadline, tz=UTC),
        task_id=task_id,
        shadow=message.shadow,
        event_dispatcher=SentUnderShadow(app, message.shadow),
        **({"headers": {PLACEMENT_HEADER: placement}} if placement else {}),
        **({"producer": producer} if producer is not None else {}),
    )


class SentUnderShadow:
    """Publishes a query's ``task-sent`` event under its shadow name.

    Celery names that event after the real task even when the message has a shadow, and an
    event monitor (Celery's state, hence Flower) lets a ``task-sent`` that arrives *after* the
    node's ``task-received`` overwrite the name: a publisher descheduled between the message
    and its event is enough. Flower would then file that query, and its runtime, under the
    bare task name. Sent under the shadow, a query is its model's from the first event on."""

    def __init__(self, app: Celery, shadow: str):
        # The dispatcher Celery itself sends this event with (cached on the app: making one
        # costs ~120 µs, too much per query); it publishes with the caller's producer.
        self._dispatcher, self._shadow = app.amqp._event_dispatcher, shadow

    def publish(self, type_: str, fields: dict[str, Any], producer: Any, **options: Any) -> Any:
        return self._dispatcher.publish(type_, {**fields, "name": self._shadow}, producer, **options)


def send_to_node(app: Celery, node: str, task: str, expires: float | None = None, **kwargs: Any) -> AsyncResult:
    """A command on the node's own queue; ``expires``: dropped if not started within that many seconds."""
    return _send(app, task, kwargs, node_queue(node), **({"expires": expires} if expires else {}))


def _send(app: Celery, task: str, kwargs: dict[str, Any], queue: str | Queue, **options: Any) -> AsyncResult:
    try:
        return app.send_task(task, kwargs=kwargs, queue=queue, kwargsrepr=redacted_kwargs(kwargs), **options)
    except OperationalError as exc:
        if redis_full(exc):  # kombu wraps a refused write too: the broker's Redis at maxmemory (507)
            raise StoreFull(REDIS_FULL) from None
        raise BrokerUnavailable(f"Cannot reach the broker: {exc}") from None


def reply_from_meta(meta: dict[str, Any]) -> QueryReply:
    """A finished query task's reply, or its typed error raised here.

    Reads Celery's result meta as data: a FAILURE is reported by its type name, never
    rebuilt from a class named in the message."""
    status = meta.get("status")
    if status == "SUCCESS":
        value = unwrap(meta.get("result"))
        if not isinstance(value, dict):
            raise RemoteError("A node answered a query with something that is not a reply.")
        return QueryReply.decode(value)
    if status == "REVOKED":
        raise QueryTimeout("The query was withdrawn or passed its deadline before a node ran it.")
    result = meta.get("result")
    kind = result.get("exc_type") if isinstance(result, dict) else None
    raise RemoteError(f"The query failed on the platform ({kind or status}); the operator's node log has the details.")


def output_of(store: BlobStore, reply: QueryReply) -> bytes:
    """The encrypted output, inline or fetched by reference."""
    return reply.output if reply.output is not None else store.get_payload(reply.output_ref or "")


# Batches: many ciphertexts of one model and key set in one task (docs/http-api.md, "Batches").


def open_batch(
    store: BlobStore,
    grant: TokenGrant,
    body: bytes,
    max_items: int,
    wait_for_worker: bool = False,
    mode: Route = Route.AUTO,
    *,
    noted: Callable[[ModelGrant], None] | None = None,
) -> tuple[EncryptedInput, ModelGrant, int]:
    """A framed batch's first ciphertext envelope (which names the model and key set of the
    whole batch), checked as a query's against the grant, its model, and how many of its items
    a node can evaluate (well framed, of that model and key set, a value concrete can
    evaluate): those are the ones counted. The others travel too and are refused one by one
    on the node, in their place; a batch with none is refused as its first item would be."""
    frames = unpack_batch(body, max_items)
    envelopes: list[EncryptedInput | None] = []
    for kind, data in frames:
        try:
            envelopes.append(EncryptedInput.decode(data) if kind == ITEM else None)
        except InvalidInput:
            envelopes.append(None)
    first = next((e for e in envelopes if e is not None), None)
    if first is None:
        EncryptedInput.decode(frames[0][1])  # raises its own refusal
        raise InvalidInput("No item of this batch is a ciphertext.")
    if noted is not None and (named := grant.find(first.model_id)) is not None:
        noted(named)
    model = check_query(grant, first.model_id, wait_for_worker, mode)
    admitted = 0
    for envelope in envelopes:
        if envelope is None or (envelope.model_id, envelope.key_id) != (first.model_id, first.key_id):
            continue
        try:
            check_ciphertext(envelope.data)
        except InvalidInput:
            continue
        admitted += 1
    if not admitted:
        admit_ciphertext(store, model, first)  # counts the refusal and raises it
    return first, model, admitted


def submit_batch(
    app: Celery,
    settings: Settings,
    store: BlobStore,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    body: bytes,
    blob_id: str,
    items: int,
    *,
    shared: bool,
    task_id: str | None = None,
    before_publish: Callable[[], None] | None = None,
    routed: Choice | None = None,
) -> AsyncResult:
    """:func:`submit` for a batch (:func:`open_batch`): its ``items`` admitted queries counted
    against the token's quota all or none (``QuotaExceeded`` when it has room for fewer), the
    framed body prepared as one query's ciphertext (inline or by reference, as a whole) and
    published as one task; given back to the quota if it was not published."""
    granted = usage.charge_runs(store.redis, grant.token_id, grant.quota, items)
    if granted < items:
        _refund(store, grant, granted)
        raise QuotaExceeded(
            f"This batch holds {items} queries and this access token's quota has room for {granted}; send a smaller batch."
        )
    return _prepare_and_publish(
        app,
        settings,
        store,
        grant,
        model,
        envelope,
        body,
        blob_id,
        QUERY_BATCH_TASK,
        items,
        shared,
        task_id,
        before_publish,
        routed,
    )
