"""Running one encrypted query on a pool node (the hot path), top to bottom.

The query was authorised before it was published (gateway or trusted in-cluster code), so the
node makes no database round trip: it checks that the ciphertext envelope names this model
and the key set the request names, takes the deserialized evaluation key from its cache (or
fetches and verifies the content-addressed blob once), and runs the preloaded model. Every
refusal is a typed error that leaves the node serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from kombu.entity import Queue

from cipherpool import inflight, workerlog
from cipherpool.context import PlatformContext
from cipherpool.dispatch import PLACEMENT_HEADER, affinity_queue_of, query_queue
from cipherpool.errors import (
    CipherpoolError,
    KeyMismatch,
    KeysOutdated,
    MalformedCiphertext,
    ModelMismatch,
    ModelUnavailable,
    RemoteError,
)
from cipherpool.fhe.evaluator import Evaluator
from cipherpool.fhe.values import check_ciphertext
from cipherpool.messages import (
    ERROR,
    ITEM,
    EncryptedInput,
    EncryptedOutput,
    Envelope,
    QueryReply,
    QueryRequest,
    error_frame,
    failed,
    ok,
    pack_batch,
    unpack_batch,
)
from cipherpool.services.queries import REGENERATE
from cipherpool.store import BlobKind
from cipherpool.workers.hooks import Hook, QueryEvent
from cipherpool.workers.node import NodeRuntime

log = logging.getLogger("cipherpool.query")


class NotBoundHere(Exception):
    """The query reached a node that no longer serves its model (unbound meanwhile)."""


class Requeue(Exception):
    """Give this message back to its queue: the task raises Celery's ``Reject(requeue=True)``."""


@dataclass(frozen=True)
class Delivery:
    """What the broker says about a message: its task id, the queue it came through, its deadline."""

    task_id: str | None = None
    routing_key: str | None = None
    expires: object = None
    placement: str | None = None  # a routed query's PLACEMENT_HEADER: "home" or "next" (cipherpool.dispatch)

    @classmethod
    def of(cls, task_request: Any) -> Delivery:
        info = getattr(task_request, "delivery_info", None) or {}
        placement = getattr(task_request, PLACEMENT_HEADER, None)
        return cls(
            getattr(task_request, "id", None),
            info.get("routing_key"),
            getattr(task_request, "expires", None),
            placement if isinstance(placement, str) else None,
        )

    def came_through(self, queue: Queue) -> bool:
        """Did the message come through ``queue``? Celery publishes to a direct exchange's queue
        through the default exchange, the queue's name as routing key; a message moved or sent
        again through the query exchange carries the queue's routing key."""
        return self.routing_key is not None and self.routing_key in (queue.name, queue.routing_key)


def may_requeue(delivery: Delivery, host_class: str, model_id: str, node: str) -> bool:
    """May a query this node cannot serve go back to the broker? Only one with a deadline
    that came through its model's own queue (its routing key, of this node's class) or this
    node's affinity queue of the model (beat moves it from there to the model's queue, as this
    node no longer serves it: :mod:`cipherpool.affinity_queues`): anything else could bounce
    between nodes forever."""
    return bool(delivery.expires) and (
        delivery.came_through(query_queue(host_class, model_id))
        or delivery.came_through(affinity_queue_of(host_class, model_id, node))
    )


def handle(ctx: PlatformContext, runtime: NodeRuntime, raw: object, delivery: Delivery) -> Envelope:
    """One query message from start to finish: its result envelope, a reply or a typed refusal.

    Every moment is announced to the node's hooks. A refusal is an envelope (the task did its
    job, which was to refuse); an unexpected exception propagates as a task failure."""
    _forget_inflight(ctx, runtime, delivery)
    binding = runtime.binding
    query = QueryEvent(node=runtime.name, task_id=delivery.task_id, binding=binding.event if binding else None)
    hooks = runtime.hooks
    try:
        request = QueryRequest.decode(raw)
    except CipherpoolError as error:
        hooks.query_received(query)
        return _refuse(query, hooks, error)
    query.model_id, query.key_id, query.token_id = request.model_id, request.key_id, request.token_id
    query.account_id = request.account_id or None
    query.version = request.version or None
    query.routed = routed(ctx, runtime, delivery, request.model_id)
    query.timings["queue_wait_s"] = max(0.0, query.received_at - request.submitted_at) if request.submitted_at else 0.0
    hooks.query_received(query)
    try:
        reply = execute(ctx, runtime, request, query)
    except NotBoundHere:
        if may_requeue(delivery, runtime.host_class, request.model_id, runtime.name):
            hooks.query_requeued(query)
            raise Requeue("node no longer serves this model") from None
        return _refuse(
            query, hooks, ModelUnavailable("This query reached a node that does not serve its model; submit it again.")
        )
    except CipherpoolError as error:
        return _refuse(query, hooks, error)
    except Exception as error:
        hooks.query_failed(query, error)
        raise
    hooks.query_computed(query)
    log.info(
        "query on %s: key %s, compute %.3f s, total %.3f s",
        query.binding.model_name if query.binding else "?",
        reply.key_cache,
        query.timings["compute_s"],
        query.timings["server_total_s"],
    )
    return ok(reply.encode())


def _forget_inflight(ctx: PlatformContext, runtime: NodeRuntime, delivery: Delivery) -> None:
    """Started: the query's in-flight record is never to be sent again. Forgotten after the
    answer on a pool node (:mod:`cipherpool.workers.afteranswer`), else at once."""
    if not delivery.task_id or not ctx.settings.broker_is_redis():
        return
    if runtime.after_answer is not None:
        runtime.after_answer.add(inflight.forgets(delivery.task_id))
    else:
        inflight.forget_quietly(ctx.store.redis, delivery.task_id)


def execute(ctx: PlatformContext, runtime: NodeRuntime, request: QueryRequest, query: QueryEvent) -> QueryReply:
    """Check the ciphertext, take the key, run the model: the encrypted reply and its timings."""
    started = query.received_at
    encrypted = _open(ctx, request)  # first: a ciphertext no node could evaluate costs no model load, no key
    evaluator, version = _evaluator(ctx, runtime, request, query)
    query.version = version or None
    query.timings["open_s"] = time.time() - started
    runtime.hooks.query_authorised(query)

    t = time.time()
    keys, hit = _keys(ctx, runtime, request, evaluator)
    query.timings["key_s"] = time.time() - t
    runtime.hooks.key_loaded(query, hit=hit, seconds=query.timings["key_s"])

    t = time.time()
    output = evaluator.run(encrypted.data, keys)
    query.timings["compute_s"] = time.time() - t

    reply = _reply(ctx, request, output)
    query.timings["server_total_s"] = time.time() - started
    return QueryReply(
        node=runtime.name, version=version, key_cache="hit" if hit else "miss", timings=dict(query.timings), **reply
    )


def _evaluator(ctx: PlatformContext, runtime: NodeRuntime, request: QueryRequest, query: QueryEvent) -> tuple[Evaluator, int]:
    """The loaded model version that runs this query: the binding's (a dedicated node), or
    one loaded on demand (a shared node)."""
    if runtime.shared_models is not None:
        evaluator, event, version, _ = runtime.shared_models.evaluator(ctx, request.model_id, request.version)
        query.binding = event
        return evaluator, version
    binding = runtime.binding
    if binding is None or binding.model_id != request.model_id:
        raise NotBoundHere(request.model_id)
    held = binding.evaluator_for(request.version)
    if held is None:
        if request.version > max(binding.versions):  # not loaded here yet: another node may have it
            raise NotBoundHere(request.model_id)
        raise KeysOutdated(
            f"This query is for version {request.version} of model {binding.model_name!r}, which "
            f"its workers no longer hold (they serve version {binding.version}): {REGENERATE}."
        )
    query.binding = binding.event
    return held, request.version or binding.version


def _refuse(query: QueryEvent, hooks: Hook, error: CipherpoolError) -> Envelope:
    hooks.query_refused(query, error)
    log.info("query refused: %s: %s", error.code, error.message)
    return failed(error)


def _open(ctx: PlatformContext, request: QueryRequest) -> EncryptedInput:
    """The ciphertext envelope, checked to belong to this model and this client's key set and
    to hold a value concrete can evaluate (before a model or key is taken: a refusal costs no load)."""
    raw = request.input if request.input is not None else ctx.store.get_payload(request.input_ref or "")
    encrypted = EncryptedInput.decode(raw)
    if encrypted.model_id != request.model_id:
        raise ModelMismatch("This ciphertext was encrypted for another model; encrypt it with this model's client.")
    if encrypted.key_id != request.key_id:
        raise KeyMismatch(
            f"This ciphertext was encrypted under key set {encrypted.key_id[:12]}…, but the query "
            f"uses key set {request.key_id[:12]}…: encrypt with the keys you uploaded (and decrypt with the same)."
        )
    check_ciphertext(encrypted.data)
    return encrypted


class _Output(TypedDict, total=False):
    """Where a reply's encrypted output is: inline, or by reference (exactly one of the two)."""

    output: bytes
    output_ref: str


def _reply(ctx: PlatformContext, request: QueryRequest, output: bytes) -> _Output:
    """The encrypted result, inline or (when large) by reference through the store."""
    body = EncryptedOutput(model_id=request.model_id, key_id=request.key_id, data=output).encode()
    if len(body) > ctx.settings.inline_max_bytes:
        return {"output_ref": ctx.store.put_payload(body, ctx.settings.payload_ttl_s)}
    return {"output": body}


def _keys(ctx: PlatformContext, runtime: NodeRuntime, request: QueryRequest, evaluator: Evaluator) -> tuple[Any, bool]:
    """The request's evaluation key, deserialized: from the node's key cache, else fetched from
    the store and loaded once (concurrent queries with the same key wait for one load). Shared
    by identical keys; on a shared node, per model (its models' keys differ in kind). Returns
    (keys, whether the cache had them)."""

    def load() -> tuple[Any, int]:
        blob = ctx.store.get(BlobKind.EVALUATION_KEY, request.blob_id)
        return evaluator.load_keys(blob), len(blob)

    cache_key = f"{request.model_id}:{request.blob_id}" if runtime.shared_models is not None else request.blob_id
    return runtime.key_cache.get_or_load(cache_key, load)


class Warmed(TypedDict):
    seconds: float
    cached: bool  # the key set was in the cache already: nothing to do


def warm(ctx: PlatformContext, runtime: NodeRuntime, raw: object) -> Warmed:
    """One throwaway evaluation with a new key set (its ciphertext sent by the client for
    this), so the key is fetched, deserialized and used before the client's first query. Not a
    query: no query hook hears it and nothing is returned but how long it took; the worker's
    log says so. A run it made is told to the hooks' ``key_warmed`` (a shared node's meter
    bills it like a query's execution); the gateway counted it against the token's quota."""
    started = time.time()
    query = QueryEvent(node=runtime.name, task_id=None, binding=None)
    request = QueryRequest.decode(raw)
    query.model_id, query.key_id, query.token_id = request.model_id, request.key_id, request.token_id
    query.account_id = request.account_id or None
    encrypted = _open(ctx, request)
    try:
        evaluator, _ = _evaluator(ctx, runtime, request, query)
    except NotBoundHere:
        raise ModelUnavailable("This node no longer serves the model.") from None
    keys, hit = _keys(ctx, runtime, request, evaluator)
    if not hit:
        t = time.time()
        evaluator.run(encrypted.data, keys)
        query.timings["compute_s"] = time.time() - t
        runtime.hooks.key_warmed(query)
    seconds = time.time() - started
    if query.worker_id:
        workerlog.write(
            ctx.store.redis,
            query.worker_id,
            f"key set {request.key_id[:12]}… warmed in {seconds:.2f} s{' (already cached)' if hit else ''}",
            source=runtime.name,
        )
    return {"seconds": seconds, "cached": hit}


def handle_batch(ctx: PlatformContext, runtime: NodeRuntime, raw: object, delivery: Delivery) -> Envelope:
    """A batch of queries (one model, one key set: one task) from start to finish, items in
    order. The key is taken once and the model loaded once for all; an item that cannot be
    evaluated (malformed, another model's or key set's, refused by the model) fails alone,
    as an error frame in its place. Each item is a query to the hooks (its ``task_id`` is the
    batch's, ``/`` its index). What concerns the whole batch (the node no longer serves its
    model, a version it no longer holds) refuses the whole batch, as it would one query."""
    _forget_inflight(ctx, runtime, delivery)
    hooks = runtime.hooks
    binding = runtime.binding
    started = time.time()
    try:
        request = QueryRequest.decode(raw)
        body = request.input if request.input is not None else ctx.store.get_payload(request.input_ref or "")
        frames = unpack_batch(body, ctx.settings.batch_max_items)
    except CipherpoolError as error:
        query = QueryEvent(node=runtime.name, task_id=delivery.task_id, binding=binding.event if binding else None)
        hooks.query_received(query)
        return _refuse(query, hooks, error)
    wait = max(0.0, started - request.submitted_at) if request.submitted_at else 0.0
    results: list[tuple[int, bytes]] = [(ERROR, b"")] * len(frames)
    pending: list[tuple[int, QueryEvent, EncryptedInput]] = []
    for index, (kind, data) in enumerate(frames):
        query = _batch_item_event(ctx, runtime, delivery, request, index, wait)
        hooks.query_received(query)
        try:
            if kind != ITEM:
                raise MalformedCiphertext("A batch's items are ciphertexts; this one is an error frame.")
            pending.append((index, query, _open(ctx, replace(request, input=data, input_ref=None))))
            query.timings["open_s"] = time.time() - query.received_at
        except CipherpoolError as error:
            _refuse(query, hooks, error)
            results[index] = error_frame(error)
    version, hit = request.version, False
    if pending:
        try:
            version, hit = _run_batch(ctx, runtime, request, delivery, pending, results)
        except _BatchRefused as refused:
            for _, query, _ in pending:
                hooks.query_refused(query, refused.error)
            log.info("batch refused: %s: %s", refused.error.code, refused.error.message)
            return failed(refused.error)
    output = pack_batch(results)
    computed = sum(q.timings.get("compute_s", 0.0) for _, q, _ in pending)
    timings = {"queue_wait_s": wait, "compute_s": computed, "server_total_s": time.time() - started}
    where: _Output = (
        {"output_ref": ctx.store.put_payload(output, ctx.settings.payload_ttl_s)}
        if len(output) > ctx.settings.inline_max_bytes
        else {"output": output}
    )
    log.info(
        "batch of %d queries: %d evaluated, compute %.3f s, total %.3f s",
        len(frames),
        len(pending),
        computed,
        timings["server_total_s"],
    )
    reply = QueryReply(
        node=runtime.name, version=version, key_cache="hit" if hit else "miss", timings=timings, batch=len(frames), **where
    )
    return ok(reply.encode())


def routed(ctx: PlatformContext, runtime: NodeRuntime, delivery: Delivery, model_id: str) -> bool | None:
    """Did the query come to its key set's home, this node, through its affinity queue (True),
    or, with key affinity on, elsewhere as a fallback (False): through the model's own queue,
    or to this node as the next in rank (its home busy)? None for anything else (a shared
    node's queue, affinity off): :attr:`QueryEvent.routed`."""
    if not ctx.settings.key_affinity:
        return None
    if delivery.came_through(affinity_queue_of(runtime.host_class, model_id, runtime.name)):
        return delivery.placement != "next"
    return False if delivery.came_through(query_queue(runtime.host_class, model_id)) else None


def _batch_item_event(
    ctx: PlatformContext, runtime: NodeRuntime, delivery: Delivery, request: QueryRequest, index: int, wait: float
) -> QueryEvent:
    binding = runtime.binding
    task_id = f"{delivery.task_id}/{index}" if delivery.task_id else None
    query = QueryEvent(node=runtime.name, task_id=task_id, binding=binding.event if binding else None)
    query.model_id, query.key_id, query.token_id = request.model_id, request.key_id, request.token_id
    query.account_id = request.account_id or None
    query.version = request.version or None
    query.routed = routed(ctx, runtime, delivery, request.model_id)
    query.timings["queue_wait_s"] = wait
    return query


def _run_batch(
    ctx: PlatformContext,
    runtime: NodeRuntime,
    request: QueryRequest,
    delivery: Delivery,
    pending: list[tuple[int, QueryEvent, EncryptedInput]],
    results: list[tuple[int, bytes]],
) -> tuple[int, bool]:
    """Evaluate a batch's admitted items in order, with one model and one key lookup; each
    item's output or error goes into ``results`` at its index. Returns (version, key cache hit)."""
    hooks = runtime.hooks
    first = pending[0][1]
    try:
        evaluator, version = _evaluator(ctx, runtime, request, first)
    except NotBoundHere:
        if may_requeue(delivery, runtime.host_class, request.model_id, runtime.name):
            for _, query, _ in pending:
                hooks.query_requeued(query)
            raise Requeue("node no longer serves this model") from None
        raise _BatchRefused(
            ModelUnavailable("This batch reached a node that does not serve its model; submit it again.")
        ) from None
    except CipherpoolError as error:
        raise _BatchRefused(error) from None
    t = time.time()
    keys, hit = _keys(ctx, runtime, request, evaluator)
    key_s = time.time() - t
    for n, (index, query, encrypted) in enumerate(pending):
        query.binding, query.version = first.binding, version or None
        hooks.query_authorised(query)
        query.timings["key_s"] = key_s if n == 0 else 0.0
        hooks.key_loaded(query, hit=hit or n > 0, seconds=query.timings["key_s"])
        t = time.time()
        try:
            output = evaluator.run(encrypted.data, keys)
        except CipherpoolError as error:
            _refuse(query, hooks, error)
            results[index] = error_frame(error)
            continue
        except Exception as error:  # noqa: BLE001 - one item's failure is that item's answer, not the batch's
            hooks.query_failed(query, error)
            log.exception("batch item %s failed", query.task_id)
            results[index] = error_frame(
                RemoteError("This item failed on the platform; the operator's node log has the details.")
            )
            continue
        query.timings["compute_s"] = time.time() - t
        query.timings["server_total_s"] = time.time() - query.received_at
        results[index] = (ITEM, EncryptedOutput(model_id=request.model_id, key_id=request.key_id, data=output).encode())
        hooks.query_computed(query)
    return version, hit


class _BatchRefused(Exception):
    """What refuses a whole batch (raised by :func:`_run_batch`, answered by :func:`handle_batch`)."""

    def __init__(self, error: CipherpoolError):
        super().__init__(error.message)
        self.error = error
