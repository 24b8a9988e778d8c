"""The Python task submission API for trusted code inside the cluster.

Code that runs with the platform's own credentials (broker and database URLs in its
``CIPHERPOOL_*`` environment) may skip the gateway and enqueue a query through Celery::

    from cipherpool.tasks.submit import submit_query, query_output

    handle = submit_query(token_id, ciphertext)      # authorised here, against the database
    output = query_output(handle, timeout=60)        # EncryptedOutput bytes; decrypt on the client

Only ids travel: the token is named by its id (``ManagementClient.list_tokens()``), the
ciphertext is the ``EncryptedInput`` bytes a ``QueryClient`` made. The same checks as at the
gateway apply (token live, assigned to the model and within its quota, model active, key set
uploaded for the model's serving version); the query counts against the token's quota.
"""

from __future__ import annotations

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from cipherpool.context import PlatformContext, platform
from cipherpool.dispatch import output_of, reply_from_meta, submit
from cipherpool.errors import QueryTimeout
from cipherpool.messages import EncryptedInput
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
