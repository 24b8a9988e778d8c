"""Streaming a request body into the blob store without holding it in memory.

Chunks are hashed as they arrive and appended to an upload key in Redis (with a TTL, so an
abandoned upload vanishes); the caller then adopts the upload under its content address or
stages it. The guard has already capped the size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from cipherpool.errors import InvalidInput, PayloadTooLarge
from cipherpool.store import BlobStore

FLUSH_BYTES = 1024 * 1024  # appended to Redis in pieces of about this size


@dataclass(frozen=True)
class Upload:
    key: str  # the temporary Redis key holding the body
    sha256: str
    size: int


async def stream_into_store(request: Request, store: BlobStore, ttl_s: int) -> Upload:
    upload = store.new_upload()
    digest, size, pending = hashlib.sha256(), 0, bytearray()
    try:
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
            pending += chunk
            if len(pending) >= FLUSH_BYTES:
                await run_in_threadpool(store.append_upload, upload, bytes(pending), ttl_s)
                pending.clear()
        if pending or size == 0:
            await run_in_threadpool(store.append_upload, upload, bytes(pending), ttl_s)
    except ClientDisconnect:  # the guard cut an oversize body off (and answered 413), or the client left
        await run_in_threadpool(store.discard_upload, upload)
        raise PayloadTooLarge("The body was cut off: it is larger than this endpoint's limit.") from None
    except BaseException:
        await run_in_threadpool(store.discard_upload, upload)
        raise
    if size == 0:
        await run_in_threadpool(store.discard_upload, upload)
        raise InvalidInput("The body is empty.")
    return Upload(upload, digest.hexdigest(), size)
