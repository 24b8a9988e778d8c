"""The shared blob store: model artifacts, evaluation keys, large query payloads.

Artifacts and keys are content-addressed (sha256), so an upload is idempotent, a reader can
verify what it got, and messages carry a 64-character id instead of tens of megabytes.
Payloads (ciphertexts too large to inline) get random ids and a TTL.

Nothing uploaded lives unowned: a body streamed in through the gateway lands under a random
upload name with a deadline, and becomes a content-addressed blob (no deadline) only once a
database row owns it (a deployed model, a registered evaluation key). Deployment artifacts wait
as *staged* uploads, per account and with a deadline, until a deploy adopts them.

Where the bytes live is a backend (:mod:`cipherpool.blobs`, ``CIPHERPOOL_BLOB_STORE``): a
directory (``fs``), an S3-compatible bucket (``s3``) or the platform's Redis (``redis``). The
store's Redis client (:attr:`BlobStore.redis`) is the platform's Redis whatever the backend:
counters, rate limits, query owners and heartbeats stay there. A pool node puts a disk cache
in front of :meth:`BlobStore.get` (:meth:`BlobStore.attach_cache`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from enum import Enum
from typing import TYPE_CHECKING

import redis
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.retry import Retry

from cipherpool.blobs import Backend, DiskCache, backend_for
from cipherpool.blobs.redis_backend import RedisBackend
from cipherpool.blobs.redis_backend import call as redis_call
from cipherpool.errors import NotFound, UploadNotFound
from cipherpool.names import BLOB_PREFIX, PAYLOAD_PREFIX, STAGED_PREFIX, UPLOAD_PREFIX

if TYPE_CHECKING:
    from cipherpool.config.settings import Settings

log = logging.getLogger("cipherpool.store")


CONNECT_TIMEOUT_S = 5.0
# How long a command waits for Redis to answer before it fails with redis.TimeoutError. Without
# it a network partition (packets dropped, no reset) blocks a command for as long as the kernel
# keeps the connection (many minutes): a heartbeat holding its lock, a gateway that never shuts
# down. In this store's (synchronous) client it bounds each read from the socket, not a whole
# reply, so a large blob (an evaluation key of hundreds of MiB) is read for as long as its bytes
# keep coming; a write is sent in one `sendall`, which it bounds whole: the largest written in
# one command is a query payload (at most CIPHERPOOL_MAX_CIPHERTEXT_BYTES, 16 MiB), as uploads
# are appended in 1 MiB pieces. The gateway's asyncio result client (gateway/results.py) bounds
# a whole reply with it, a task's state (small: large outputs are payloads). A pub/sub reader is
# not affected: redis-py waits for a message with the reader's own timeout (or without one),
# never this one.
SOCKET_TIMEOUT_S = 30.0
# A pooled connection that died under us (Redis restarted, a proxy dropped it) is replaced and
# the command sent again, once. Once, not redis-py 8's default of ten: with Redis down the
# caller gets broker_unavailable at once instead of a request stalled for seconds.
#
# Sending it again may do it twice: redis-py retries on a ConnectionError, and one can come
# after the command was sent (the connection reset while its reply was on the way), when Redis
# may have run it. So this client's retries are for idempotent commands, which is what the
# platform sends it: SET NX (a content-addressed blob), GET, EXISTS, STRLEN, GETRANGE,
# EXPIRE/PERSIST, DEL, SET of a value that replaces the last (a heartbeat, a component's
# state). A command whose second run would count twice is not idempotent: a retried APPEND
# of an upload piece would store it twice (the content address no longer matches, and a read
# refuses the blob as corrupt), a retried INCR counts one more (harmless for an event id or a
# rate limit's window). Counters that must never double (the metering of shared nodes) use a
# client without retries (PlatformContext.counters). A redis.TimeoutError is not retried: the
# command was sent and Redis did not answer within SOCKET_TIMEOUT_S (a server hung or
# partitioned away), so a second try would double the wait, and might run it twice.
STALE_RETRIES = 1
STALE_ERRORS: tuple[type[redis.RedisError], ...] = (redis.ConnectionError,)  # retried once (above)
# What an unreachable Redis raises (a caller answers broker_unavailable, or polls instead).
RETRY_ERRORS: tuple[type[redis.RedisError], ...] = (redis.ConnectionError, redis.TimeoutError)


def retry_backoff() -> AbstractBackoff:
    """The pause before that one retry: short, as the new connection is usually there at once
    (50 ms, enough for a server that is just taking connections again)."""
    return ExponentialBackoff(cap=0.25, base=0.025)


class BlobKind(str, Enum):
    CLIENT_ZIP = "client"
    SERVER_ZIP = "server"
    EVALUATION_KEY = "evk"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """The platform's blob store: the backend's bytes, and the platform's Redis beside it."""

    def __init__(self, client: redis.Redis, backend: Backend | None = None, sweep_interval_s: float = 300.0):
        self._redis = client
        self._backend: Backend = backend if backend is not None else RedisBackend(client)
        self._cache: DiskCache | None = None
        self._sweep_interval_s = sweep_interval_s
        self._next_sweep = 0.0
        self._sweeping = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> BlobStore:
        """Everything in the Redis at ``url`` (the ``redis`` backend)."""
        return cls(redis_client(url))

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        """The platform's Redis (``store_url``, else the broker's) and the backend the settings
        name (``blob_store``)."""
        client = redis_client(settings.effective_store_url())
        return cls(client, backend_for(settings, client), sweep_interval_s=settings.blob_sweep_interval_s)

    @property
    def redis(self) -> redis.Redis:
        """The platform's Redis (counters, rate limits, results' owners), whatever the backend."""
        return self._redis

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def kind(self) -> str:
        """Where blobs live: "fs", "s3" or "redis"."""
        return self._backend.kind

    @property
    def cache(self) -> DiskCache | None:
        return self._cache

    def attach_cache(self, cache: DiskCache | None) -> None:
        """Read content-addressed blobs through a node's disk cache from now on."""
        self._cache = cache

    def ping(self) -> None:
        """The platform's Redis and the backend both answer."""
        redis_call(self._redis.ping)
        if self._backend.kind != "redis":
            self._backend.ping()

    def put(self, kind: BlobKind, data: bytes) -> str:
        blob_id = sha256_hex(data)
        self._backend.put(self._key(kind, blob_id), data)  # an identical blob already there is left alone
        return blob_id

    def exists(self, kind: BlobKind, blob_id: str) -> bool:
        return self._backend.exists(self._key(kind, blob_id))

    def delete(self, kind: BlobKind, blob_id: str) -> None:
        """Drop a blob no row references any more (the caller checked)."""
        self._backend.delete(self._key(kind, blob_id))

    def size(self, kind: BlobKind, blob_id: str) -> int:
        return self._backend.size(self._key(kind, blob_id))

    def head(self, kind: BlobKind, blob_id: str, n: int) -> bytes:
        """The first n bytes, without moving a whole key over the network."""
        return self._backend.head(self._key(kind, blob_id), n)

    def get(self, kind: BlobKind, blob_id: str) -> bytes:
        """The blob, verified against its sha256; through the disk cache where one is attached."""
        if self._cache is not None:
            return self._cache.get(kind.value, blob_id, lambda: self._fetch(kind, blob_id))
        return self._fetch(kind, blob_id)

    def _fetch(self, kind: BlobKind, blob_id: str) -> bytes:
        data = self._backend.get(self._key(kind, blob_id))
        if data is None:
            raise NotFound(f"No {kind.value} blob {blob_id[:12]}… in the store.")
        if sha256_hex(data) != blob_id:
            raise NotFound(f"Blob {blob_id[:12]}… is corrupt in the store; upload it again.")
        return data

    def blobs(self, kind: BlobKind | None = None) -> dict[tuple[BlobKind, str], int]:
        """Every content-addressed blob (of one kind, or all) and its size: for `store check`."""
        prefix = BLOB_PREFIX + (f"{kind.value}:" if kind else "")
        found = {}
        for name, size in self._backend.scan(prefix):
            blob_kind, _, blob_id = name[len(BLOB_PREFIX) :].partition(":")
            try:
                found[(BlobKind(blob_kind), blob_id)] = size
            except ValueError:  # a kind this release does not know
                continue
        return found

    # ---- uploads streamed in by the gateway --------------------------------------------

    @staticmethod
    def new_upload() -> str:
        return UPLOAD_PREFIX + uuid.uuid4().hex

    def append_upload(self, upload: str, chunk: bytes, ttl_s: int) -> None:
        """Add a chunk to an upload in progress; the deadline drops an abandoned one."""
        self._backend.append(upload, chunk, ttl_s)
        self._maybe_sweep()

    def upload_head(self, upload: str, n: int) -> bytes:
        return self._backend.head(upload, n)

    def discard_upload(self, upload: str) -> None:
        self._backend.delete(upload)

    def adopt(self, upload: str, kind: BlobKind, blob_id: str) -> None:
        """Make a finished upload (or a staged artifact) the content-addressed blob ``blob_id``,
        with no deadline: a database row now owns it."""
        if not self._backend.persist(upload, self._key(kind, blob_id)):
            raise UploadNotFound("The upload expired before it was used; upload it again.")

    def stage(self, upload: str, account_id: str, blob_id: str, ttl_s: int) -> None:
        """Keep a finished upload as this account's staged artifact for ttl_s seconds."""
        if not self._backend.move(upload, self.staged_key(account_id, blob_id), ttl_s):
            raise UploadNotFound("The upload expired before it was staged; upload it again.")

    def get_staged(self, account_id: str, blob_id: str) -> bytes:
        data = self._backend.get_temp(self.staged_key(account_id, blob_id))
        if data is None or sha256_hex(data) != blob_id:
            raise UploadNotFound(f"No staged upload {blob_id[:12]}… in this account (it expires after an hour); upload it again.")
        return data

    @staticmethod
    def staged_key(account_id: str, blob_id: str) -> str:
        return f"{STAGED_PREFIX}{account_id}:{blob_id}"

    # ---- query payloads --------------------------------------------------------------

    def put_payload(self, data: bytes, ttl_s: int) -> str:
        ref = uuid.uuid4().hex
        self._backend.put_temp(PAYLOAD_PREFIX + ref, data, ttl_s)
        self._maybe_sweep()
        return ref

    def get_payload(self, ref: str) -> bytes:
        """A payload by reference. Kept until its TTL: a redelivered query reads it again."""
        data = self._backend.get_temp(PAYLOAD_PREFIX + ref) if ref else None
        if data is None:
            raise NotFound("The query payload expired or was never stored; submit it again.")
        return data

    def delete_payload(self, ref: str) -> None:
        self._backend.delete(PAYLOAD_PREFIX + ref)

    def expire_payload(self, ref: str, ttl_s: int) -> None:
        self._backend.expire(PAYLOAD_PREFIX + ref, ttl_s)

    # ---- temporaries past their deadline -----------------------------------------------

    def sweep(self) -> int:
        """Remove temporaries past their deadline now (fs, s3); how many went."""
        return self._backend.sweep()

    def _maybe_sweep(self) -> None:
        """At most every ``blob_sweep_interval_s``, sweep in a thread of its own: every process
        that writes temporaries reclaims the expired ones, with no process of its own for it."""
        if self._backend.kind == "redis" or time.monotonic() < self._next_sweep:
            return
        if not self._sweeping.acquire(blocking=False):
            return
        self._next_sweep = time.monotonic() + self._sweep_interval_s

        def run() -> None:
            try:
                removed = self._backend.sweep()
                if removed:
                    log.info("blob store: removed %d temporaries past their deadline", removed)
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.warning("blob store: the sweep of expired temporaries failed", exc_info=True)
            finally:
                self._sweeping.release()

        threading.Thread(target=run, name="blob-sweep", daemon=True).start()

    @staticmethod
    def _key(kind: BlobKind, blob_id: str) -> str:
        return f"{BLOB_PREFIX}{kind.value}:{blob_id}"


def redis_client(url: str) -> redis.Redis:
    """The platform's Redis client: timeouts and one retry of a stale connection (above)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(retry_backoff(), STALE_RETRIES, supported_errors=STALE_ERRORS),
    )
