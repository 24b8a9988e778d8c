"""Encrypted queries: submit, wait (long poll), withdraw.

``POST /v1/queries`` takes the ciphertext envelope as raw bytes, authorises it against the
token's cached grant, publishes a task of ids on the model's queue and answers 202 with the
query id, or, with ``?wait=S``, the result itself if it is ready within S seconds (one round
trip for a fast model). ``POST /v1/queries/batch`` does the same for a framed batch of
ciphertexts, one task and one id for all (docs/http-api.md, "Batches").
``GET /v1/queries/{id}?wait=S`` long-polls: no request is held longer than ``long_poll_s``,
so neither an HTTP worker nor a proxy timeout bounds how long a query may run. Results are
raw bytes with the node's timings in headers; never the node's name (a host name of the
platform, and whose node served whom is no end user's business).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cipherpool import inflight
from cipherpool.affinity import Choice
from cipherpool.api.schemas import QUERY_ID_PATTERN, QueryAccepted
from cipherpool.config.settings import Settings
from cipherpool.dispatch import fused_submit, open_batch, open_envelope, output_of, reply_from_meta, submit_batch
from cipherpool.dispatch import submit as submit_query
from cipherpool.errors import CipherpoolError, QueryNotFound
from cipherpool.gateway import admission, affinity
from cipherpool.gateway.admission import LOOP_MAX_BYTES, PENDING, Admitted, PendingCount
from cipherpool.gateway.auth import require_grant
from cipherpool.gateway.deps import BINARY_BODY, BINARY_RESPONSE, OCTET_STREAM, Gateway, Grant, caller
from cipherpool.gateway.refusals import mark_relayed, note_model
from cipherpool.gateway.results import TaskMeta, is_ready
from cipherpool.gateway.state import GatewayState
from cipherpool.messages import BATCH_CONTENT_TYPE, EncryptedInput
from cipherpool.names import QUERY_OWNER_PREFIX
from cipherpool.services import keyuse, usage
from cipherpool.services.queries import ModelGrant, Route, TokenGrant, route

log = logging.getLogger("cipherpool.gateway")
router = APIRouter(prefix="/v1/queries", tags=["end user"])
QueryId = Annotated[str, Path(pattern=QUERY_ID_PATTERN)]
Wait = Annotated[float, Query(ge=0, le=600, description="seconds to wait for the result (capped by the gateway)")]
WaitForWorker = Annotated[bool, Query(description="queue the query even if no worker is up for the model yet")]
Mode = Annotated[Route, Query(description="auto: a dedicated worker when one is up, else a shared node")]
KEEP_AFTER_READ_S = 60  # a delivered result stays this long, for a client's retry
LOOP_MAX_AT_ONCE = 32  # queries published from the event loop at once; more go to the thread pool
RESULT_HEADERS: dict[int | str, dict[str, Any]] = {200: BINARY_RESPONSE, 202: {"model": QueryAccepted}}
BATCH_BODY = {
    "requestBody": {"required": True, "content": {BATCH_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
}


@router.post("", status_code=202, responses=RESULT_HEADERS, openapi_extra=BINARY_BODY)
async def submit(request: Request, wait: Wait = 0.0, wait_for_worker: WaitForWorker = False, mode: Mode = Route.AUTO) -> Response:
    """Refused with ``no_worker_up`` (503) while no worker serves the model, unless
    ``wait_for_worker``: then the query waits in the model's queue (until its deadline).
    ``mode``: a dedicated worker, a shared node, or ``auto`` (dedicated when one is up)."""
    gw, grant = caller(request)
    body = await request.body()
    pending: PendingCount | None = request.scope.get("state", {}).get(PENDING)  # the guard's count, left to the admission
    try:
        return await _submit_query(request, gw, grant, body, pending, wait, wait_for_worker, mode)
    except _Again as again:  # the change counters moved: the rate is counted; the ordinary way with the new grant
        request.scope["state"]["principal"] = again.grant
        return await _submit_query(request, gw, again.grant, body, None, wait, wait_for_worker, mode)


class _Again(Exception):
    """The query's admission found the change counters moved and admitted nothing: submit it
    again, the ordinary way, as ``grant`` (authenticated again)."""

    def __init__(self, grant: TokenGrant):
        super().__init__("the change counters moved")
        self.grant = grant


async def _submit_query(
    request: Request,
    gw: GatewayState,
    grant: TokenGrant,
    body: bytes,
    pending: PendingCount | None,
    wait: float,
    wait_for_worker: bool,
    mode: Route,
) -> Response:
    try:
        envelope, model = open_envelope(grant, body, wait_for_worker, mode, noted=lambda named: note_model(request, named))
    except CipherpoolError:
        await _settle(pending, grant)  # a rate refusal or a failed authentication comes first, as it did
        raise
    shared = route(model, mode, wait_for_worker) == Route.SHARED
    query_id = gw.waiter.new_id()  # heard without a subscription of its own (cipherpool.gateway.results)
    if wait <= 0:
        await _publish_query(gw, grant, model, envelope, body, query_id, shared, pending)
        return _accepted(query_id, None)
    async with gw.waiter.watch(query_id) as watch:
        await _publish_query(gw, grant, model, envelope, body, query_id, shared, pending)
        meta = await watch.result(min(wait, gw.settings.long_poll_s))
    return await _answer(request, gw, query_id, meta)


async def _settle(pending: PendingCount | None, grant: TokenGrant) -> None:
    """The guard's count of this request, if it was left to the admission and is not made:
    made now; a change it finds means going again as the new grant (:class:`_Again`)."""
    if pending is None or pending.done:
        return
    fresh = require_grant(await pending.settle())
    if fresh != grant:
        raise _Again(fresh)


@router.post("/batch", status_code=202, responses=RESULT_HEADERS, openapi_extra=BATCH_BODY)
async def submit_many(
    request: Request, gw: Gateway, grant: Grant, wait: Wait = 0.0, wait_for_worker: WaitForWorker = False, mode: Mode = Route.AUTO
) -> Response:
    """A batch: many ciphertexts of one model and key set, framed (docs/http-api.md,
    "Batches"), run as one task on one node and answered item by item under one query id:
    the result is a framed body of each item's output or typed error, in order. Counted
    against the token's quota per item a node can evaluate, all or none."""
    body = await request.body()
    envelope, model, items = open_batch(
        gw.store,
        grant,
        body,
        gw.settings.batch_max_items,
        wait_for_worker,
        mode,
        noted=lambda named: note_model(request, named),
    )
    shared = route(model, mode, wait_for_worker) == Route.SHARED
    query_id = gw.waiter.new_id()  # heard without a subscription of its own (cipherpool.gateway.results)
    if wait <= 0:
        await run_in_threadpool(_publish, gw, grant, model, envelope, body, query_id, shared, items)
        return _accepted(query_id, None)
    async with gw.waiter.watch(query_id) as watch:
        await run_in_threadpool(_publish, gw, grant, model, envelope, body, query_id, shared, items)
        meta = await watch.result(min(wait, gw.settings.long_poll_s))
    return await _answer(request, gw, query_id, meta)


@router.get("/{query_id}", responses=RESULT_HEADERS)
async def result(request: Request, query_id: QueryId, wait: Wait = 0.0) -> Response:
    gw, grant = caller(request)
    await _check_owner(gw, grant, query_id)
    meta = await gw.waiter.meta(query_id)  # most polls find the answer there: no subscription
    if not is_ready(meta) and wait > 0:
        meta = await gw.waiter.wait(query_id, min(wait, gw.settings.long_poll_s))
    return await _answer(request, gw, query_id, meta)


@router.delete("/{query_id}", status_code=204)
async def withdraw(query_id: QueryId, gw: Gateway, grant: Grant) -> Response:
    """Withdraw a query nobody waits for any more: a node that has not started it drops it."""
    await _check_owner(gw, grant, query_id)
    await run_in_threadpool(gw.celery.control.revoke, query_id)
    await run_in_threadpool(inflight.forget_quietly, gw.store.redis, query_id)  # withdrawn: never sent again
    if gw.router is not None:
        gw.router.release(query_id)
    return Response(status_code=204)


async def _publish_query(
    gw: GatewayState,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    body: bytes,
    query_id: str,
    shared: bool,
    pending: PendingCount | None = None,
) -> None:
    """A query published on the event loop when all it needs is at hand: a small body, its key
    reference cached, the platform's Redis the result waiter's (whose asyncio client makes the
    round trip) and the broker, and its message one the platform builds
    (:func:`~cipherpool.dispatch.fused_submit`): counted, recorded and queued by one script,
    with no thread-pool hop (two thread wake-ups: 0.04 ms back to back, 0.2 ms once idle,
    benchmarks/wake_floor.py). Anything else goes to the thread pool, as a batch does: a body
    over :data:`LOOP_MAX_BYTES` (building its message would hold the loop), and the queries
    past :data:`LOOP_MAX_AT_ONCE` at a time (each holds one of the waiter's connections, which
    the guard and the waits share).

    ``pending``: the guard left this request's count to the admission, one script for both
    (:mod:`cipherpool.gateway.admission`); any other way settles it first."""
    client = gw.waiter.client_for(gw.settings.effective_store_url())
    blob_id = gw.auth.cached_key_blob(grant, model, envelope.key_id) if client is not None else None
    if client is None or blob_id is None or len(body) > LOOP_MAX_BYTES or gw.publishing_on_loop >= LOOP_MAX_AT_ONCE:
        await _settle(pending, grant)
        await run_in_threadpool(_publish, gw, grant, model, envelope, body, query_id, shared)
        return
    routed = affinity.route(gw.router, gw.settings, query_id, envelope.key_id, model, shared)
    gw.publishing_on_loop += 1
    try:
        owner = [_owner_record(gw.settings, grant, query_id)]
        store, s = gw.store, gw.settings
        writes = fused_submit(
            gw.celery,
            s,
            store,
            grant,
            model,
            envelope,
            body,
            blob_id,
            shared=shared,
            task_id=query_id,
            routed=routed,
            records=owner,
        )
        if writes is None:
            await _settle(pending, grant)
            await run_in_threadpool(_submit, gw, grant, model, envelope, body, blob_id, query_id, shared, None, routed)
            return
        if pending is not None and not pending.done:
            done, seen = await admission.admit(client, gw.limiter, pending, grant.quota, writes)
            if done == Admitted.CHANGED:
                raise _Again(require_grant(await pending.changed(seen)))
            if done == Admitted.REFUSED:  # a full Redis refused the count: the guard's (here), then as before
                pending.done = False
                await _settle(pending, grant)
                await usage.charge_async(client, grant.token_id, grant.quota, then=writes)
        else:
            await usage.charge_async(client, grant.token_id, grant.quota, then=writes)
    except BaseException:  # a cancelled request too: its node's room is given back
        if gw.router is not None:
            gw.router.release(query_id)  # never sent: its node has room again
        raise
    finally:
        gw.publishing_on_loop -= 1
    if keyuse.due(grant.token_id, envelope.key_id):  # once a minute per key set: a thread-pool hop then
        await run_in_threadpool(keyuse.record, gw.store.redis, grant.token_id, envelope.key_id)


def _publish(
    gw: GatewayState,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    body: bytes,
    query_id: str,
    shared: bool,
    batch: int | None = None,
) -> None:
    """Key lookup (cached), the key set's node (:mod:`cipherpool.gateway.affinity`), then the
    submit sequence with the query's owner recorded: one trip to the thread pool. ``batch``:
    the body is a batch of that many admitted items."""
    s = gw.settings
    blob_id = gw.auth.key_blob(grant, model, envelope.key_id)
    routed = affinity.route(gw.router, s, query_id, envelope.key_id, model, shared)
    try:
        _submit(gw, grant, model, envelope, body, blob_id, query_id, shared, batch, routed)
    except Exception:
        if gw.router is not None:
            gw.router.release(query_id)  # never sent: its node has room again
        raise


def _submit(
    gw: GatewayState,
    grant: TokenGrant,
    model: ModelGrant,
    envelope: EncryptedInput,
    body: bytes,
    blob_id: str,
    query_id: str,
    shared: bool,
    batch: int | None,
    routed: Choice | None,
) -> None:
    s = gw.settings
    owner_ttl_s = int(s.query_timeout_s + s.result_expires_s)

    def record_owner() -> None:
        gw.store.redis.set(QUERY_OWNER_PREFIX + query_id, grant.token_id, ex=owner_ttl_s)

    if batch is not None:
        submit_batch(
            gw.celery,
            s,
            gw.store,
            grant,
            model,
            envelope,
            body,
            blob_id,
            batch,
            shared=shared,
            task_id=query_id,
            before_publish=record_owner,
            routed=routed,
        )
        return
    submit_query(
        gw.celery,
        s,
        gw.store,
        grant,
        model,
        envelope,
        body,
        blob_id,
        shared=shared,
        task_id=query_id,
        records=[_owner_record(s, grant, query_id)],  # with its count
        routed=routed,
    )


def _owner_record(s: Settings, grant: TokenGrant, query_id: str) -> usage.Write:
    """The query's owner (its token), written with its count: whose result it is to read."""
    return ("SET", QUERY_OWNER_PREFIX + query_id, grant.token_id, "EX", int(s.query_timeout_s + s.result_expires_s))


async def _check_owner(gw: GatewayState, grant: TokenGrant, query_id: str) -> None:
    """Whose query it is, read on the result waiter's asyncio client where the store is its
    Redis (a poll's thread-pool hop saved, as :func:`_publish_query` does), else in the pool."""
    key = QUERY_OWNER_PREFIX + query_id
    client = gw.waiter.client_for(gw.settings.effective_store_url())
    owner = await (client.get(key) if client is not None else run_in_threadpool(gw.store.redis.get, key))
    if not isinstance(owner, bytes) or owner.decode() != grant.token_id:  # None: unknown, or expired
        raise QueryNotFound("No such query for this token (or its result has expired).")


async def _answer(request: Request, gw: GatewayState, query_id: str, meta: TaskMeta | None) -> Response:
    if meta is None or not is_ready(meta):
        return _accepted(query_id, meta)
    if gw.router is not None:
        gw.router.release(query_id)  # answered: its node has room again (a no-op for another gateway's query)
    try:
        reply = reply_from_meta(meta)
    except CipherpoolError:
        mark_relayed(request)  # the node's refusal, counted where it was made (each poll would count it again)
        raise
    await gw.waiter.keep_for(query_id, KEEP_AFTER_READ_S)
    if reply.output_ref:
        output: bytes | None = await run_in_threadpool(output_of, gw.store, reply)
        await run_in_threadpool(gw.store.expire_payload, reply.output_ref, KEEP_AFTER_READ_S)
    else:
        output = reply.output
    headers = {
        "X-Cipherpool-Query": query_id,
        "X-Cipherpool-Model-Version": str(reply.version),
        "X-Cipherpool-Key-Cache": reply.key_cache,
        "X-Cipherpool-Timings": json.dumps(reply.timings, separators=(",", ":")),
    }
    if reply.batch:
        headers["X-Cipherpool-Batch"] = str(reply.batch)
    return Response(output, media_type=BATCH_CONTENT_TYPE if reply.batch else OCTET_STREAM, headers=headers)


def _accepted(query_id: str, meta: TaskMeta | None) -> JSONResponse:
    status = "started" if meta and meta.get("status") == "STARTED" else "queued"
    body = QueryAccepted(id=query_id, status=status).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/queries/{query_id}"})
