"""The Python task submission API for trusted code inside the cluster.

Code that runs with the platform's own credentials (broker and database URLs in its
``CIPHERPOOL_*`` environment) may skip the gateway and enqueue a query through Celery::

    from cipherpool.tasks.submit import submit_query, query_output

    handle = submit_query(token_id, ciphertext)      # authorised here, against the database
    output = query_output(handle, timeout=60)        # EncryptedOutput bytes; decrypt on the client

    handle = submit_batch(token_id, [c1, c2, c3])    # one task, one node, the key taken once
    items = batch_outputs(handle, timeout=60)        # per item: output bytes, or its typed error

Only ids travel: the token is named by its id (``ManagementClient.list_tokens()``), the
ciphertext is the ``EncryptedInput`` bytes a ``QueryClient`` made. The same checks as at the
gateway apply (token live, assigned to the model and within its quota, model active, key set
uploaded for the model's serving version); the query counts against the token's quota (a
batch: each item a node can evaluate, all or none). In-cluster queries are not routed by key
set (:mod:`cipherpool.affinity`): they go to the model's queue, which every worker consumes.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from cipherpool.context import PlatformContext, platform
from cipherpool.dispatch import open_batch, output_of, reply_from_meta, submit
from cipherpool.dispatch import submit_batch as submit_batch_task
from cipherpool.errors import CipherpoolError, QueryTimeout
from cipherpool.messages import ITEM, EncryptedInput, batch_items, pack_batch
from cipherpool.services.queries import Route, check_query, grant_for_id, key_blob, route
from cipherpool.tasks.app import app


def submit_query(
    token_id: str,
    ciphertext: bytes,
    *,
    wait_for_worker: bool = False,
    mode: Route = Route.AUTO,
    ctx: PlatformContext | None = None,
) -> AsyncResult:
    """Authorise and enqueue one query; returns Celery's handle for it. With no worker up
    for the model it is refused (NoWorkerUp) unless ``wait_for_worker``."""
    ctx = ctx or platform()
    envelope = EncryptedInput.decode(ciphertext)  # decode
    with ctx.session() as session:  # authorise, against the database as it is now
        grant = grant_for_id(session, token_id)
        model = check_query(grant, envelope.model_id, wait_for_worker, Route(mode))
        shared = route(model, Route(mode), wait_for_worker) == Route.SHARED
        blob_id = key_blob(session, grant, model, envelope.key_id)
    return submit(app, ctx.settings, ctx.store, grant, model, envelope, ciphertext, blob_id, shared=shared)


def submit_batch(
    token_id: str,
    ciphertexts: Sequence[bytes],
    *,
    wait_for_worker: bool = False,
    mode: Route = Route.AUTO,
    ctx: PlatformContext | None = None,
) -> AsyncResult:
    """Authorise and enqueue a batch: ciphertexts of one model and key set, run as one task on
    one node and answered item by item (:func:`batch_outputs`). The checks are the gateway's
    (``POST /v1/queries/batch``): the first ciphertext names the model and key set, at most
    ``CIPHERPOOL_BATCH_MAX_ITEMS`` items; an item a node cannot evaluate is not counted and fails
    alone, in its place."""
    ctx = ctx or platform()
    body = pack_batch([(ITEM, c) for c in ciphertexts])
    with ctx.session() as session:
        grant = grant_for_id(session, token_id)
        envelope, model, items = open_batch(ctx.store, grant, body, ctx.settings.batch_max_items, wait_for_worker, Route(mode))
        shared = route(model, Route(mode), wait_for_worker) == Route.SHARED
        blob_id = key_blob(session, grant, model, envelope.key_id)
    return submit_batch_task(app, ctx.settings, ctx.store, grant, model, envelope, body, blob_id, items, shared=shared)


def batch_outputs(
    handle: AsyncResult, timeout: float | None = None, *, ctx: PlatformContext | None = None
) -> list[bytes | CipherpoolError]:
    """Wait for a batch submitted with :func:`submit_batch`: each item's encrypted output, or
    its typed error (not raised: the others stand), in order. What fails the whole batch (no
    answer in time, the node no longer serving the model) is raised."""
    ctx = ctx or platform()
    return batch_items(query_output(handle, timeout, ctx=ctx), ctx.settings.batch_max_items)


def query_output(handle: AsyncResult, timeout: float | None = None, *, ctx: PlatformContext | None = None) -> bytes:
    """Wait for a query submitted with :func:`submit_query`; its encrypted output, or its typed error."""
    ctx = ctx or platform()
    try:
        handle.get(timeout=timeout or ctx.settings.query_timeout_s, propagate=False)
    except CeleryTimeout:
        handle.revoke()
        raise QueryTimeout("No answer within the timeout; the query was withdrawn.") from None
    meta = {"status": handle.state, "result": handle.result}
    reply = reply_from_meta(meta if handle.state != "FAILURE" else {"status": "FAILURE", "result": None})
    output = output_of(ctx.store, reply)
    handle.forget()
    return output
