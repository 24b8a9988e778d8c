"""Running one encrypted query on a pool node (the hot path).

The query was authorised before it was published (gateway or trusted in-cluster code), so the
node makes no database round trip: it checks that the ciphertext envelope names this model
and the key set the request names, takes the deserialized evaluation key from its cache (or
fetches and verifies the content-addressed blob once), and runs the preloaded model. Every
refusal is a typed error that leaves the node serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cipherpool.errors import KeyMismatch, ModelMismatch
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest
from cipherpool.names import model_queue
from cipherpool.store import BlobKind
from cipherpool.workers.context import PlatformContext
from cipherpool.workers.node import NodeRuntime

log = logging.getLogger("cipherpool.query")


class NotBoundHere(Exception):
    """The query reached a node that no longer serves its model (unbound meanwhile)."""


def may_requeue(task_request: Any, model_id: str) -> bool:
    """May a query this node cannot serve go back to the broker? Only one with a deadline
    that came through its model's own queue: anything else could bounce between nodes forever."""
    routing_key = (getattr(task_request, "delivery_info", None) or {}).get("routing_key")
    return bool(getattr(task_request, "expires", None)) and routing_key == model_queue(model_id)


def execute(ctx: PlatformContext, runtime: NodeRuntime, request: QueryRequest) -> QueryReply:
    started = time.time()
    timings = {"queue_wait_s": max(0.0, started - request.submitted_at) if request.submitted_at else 0.0}
    binding = runtime.binding
    if binding is None or binding.model_id != request.model_id:
        raise NotBoundHere(request.model_id)

    blob_id = request.blob_id
    encrypted = _open(ctx, request)
    timings["open_s"] = time.time() - started

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
