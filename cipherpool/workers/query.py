"""Running one encrypted query on a pool node (the hot path).

Order matters for cost: cheap checks (envelope, database authorisation) come before the
evaluation key is fetched or deserialized, and the key is taken from the node's cache when it
can be. Every refusal is a typed error that leaves the node serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cipherpool.errors import KeyMismatch, ModelMismatch
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest
from cipherpool.services.queries import authorize_query, require_key
from cipherpool.store import BlobKind
from cipherpool.workers.context import PlatformContext
from cipherpool.workers.node import NodeRuntime

log = logging.getLogger("cipherpool.query")


class NotBoundHere(Exception):
    """The query reached a node that no longer serves its model (unbound meanwhile)."""


def execute(ctx: PlatformContext, runtime: NodeRuntime, request: QueryRequest) -> QueryReply:
    started = time.time()
    timings = {"queue_wait_s": max(0.0, started - request.submitted_at) if request.submitted_at else 0.0}
    binding = runtime.binding
    if binding is None or binding.model_id != request.model_id:
        raise NotBoundHere(request.model_id)

    blob_id = _authorize(ctx, request)
    timings["authorize_s"] = time.time() - started
    encrypted = _open(ctx, request)

    t = time.time()

    def load():
        blob = ctx.store.get(BlobKind.EVALUATION_KEY, blob_id)
        return binding.evaluator.load_keys(blob), len(blob)

    keys, hit = runtime.key_cache.get_or_load(blob_id, load)  # shared by identical keys
    timings["key_s"] = time.time() - t

    t = time.time()
    output = binding.evaluator.run(encrypted.data, keys)
    timings["compute_s"] = time.time() - t

    reply = _reply(ctx, request, output)
    timings["server_total_s"] = time.time() - started
    runtime.record(ok=True, compute_s=timings["compute_s"])
    log.info("query on %s: key %s, compute %.3f s, total %.3f s", binding.model_name,
             "hit" if hit else "miss", timings["compute_s"], timings["server_total_s"])
    return QueryReply(node=runtime.name, key_cache="hit" if hit else "miss", timings=timings, **reply)


def _authorize(ctx: PlatformContext, request: QueryRequest) -> str:
    """The blob id of the evaluation key this query may use, or the reason it may not run."""
    with ctx.session() as session:
        token, _ = authorize_query(session, request.token, request.model_id)
        return require_key(session, token, request.key_id).blob_id


def _open(ctx: PlatformContext, request: QueryRequest) -> EncryptedInput:
    """The ciphertext envelope, checked to belong to this model and this client's key set."""
    raw = request.input if request.input is not None else ctx.store.get_payload(request.input_ref or "")
    encrypted = EncryptedInput.decode(raw)
    if encrypted.model_id != request.model_id:
        raise ModelMismatch("This ciphertext was encrypted for another model; encrypt it with this model's client.")
    if encrypted.key_id != request.key_id:
        raise KeyMismatch(
            f"This ciphertext was encrypted under key set {encrypted.key_id[:12]}…, but the query "
            f"uses key set {request.key_id[:12]}…: encrypt with the keys you uploaded (and decrypt with the same)."
        )
    return encrypted


def _reply(ctx: PlatformContext, request: QueryRequest, output: bytes) -> dict[str, Any]:
    """The encrypted result, inline or (when large) by reference through the store."""
    body = EncryptedOutput(model_id=request.model_id, key_id=request.key_id, data=output).encode()
    if len(body) > ctx.settings.inline_max_bytes:
        return {"output_ref": ctx.store.put_payload(body, ctx.settings.payload_ttl_s)}
    return {"output": body}
