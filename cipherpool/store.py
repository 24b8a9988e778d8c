"""The shared blob store (Redis): model artifacts, evaluation keys, large query payloads.

Artifacts and keys are content-addressed (sha256), so an upload is idempotent, a reader can
verify what it got, and messages carry a 64-character id instead of tens of megabytes.
Payloads (ciphertexts too large to inline) get random ids and a TTL.

Nothing uploaded lives unowned: a body streamed in through the gateway lands under a random
upload key with a TTL, and becomes a content-addressed blob (no TTL) only once a database row
owns it (a deployed model, a registered evaluation key). Deployment artifacts wait as *staged*
uploads, per account and with a TTL, until a deploy adopts them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from enum import Enum
from typing import ParamSpec, TypeVar

import redis
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.retry import Retry

from cipherpool.errors import BrokerUnavailable, NotFound, StoreFull, UploadNotFound
from cipherpool.names import BLOB_PREFIX, PAYLOAD_PREFIX, STAGED_PREFIX, UPLOAD_PREFIX


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


P = ParamSpec("P")
T = TypeVar("T")


class BlobKind(str, Enum):
    CLIENT_ZIP = "client"
    SERVER_ZIP = "server"
    EVALUATION_KEY = "evk"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, client: redis.Redis):
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> BlobStore:
        return cls(redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30,
            retry=Retry(retry_backoff(), STALE_RETRIES, supported_errors=STALE_ERRORS),
        ))

    @property
    def redis(self) -> redis.Redis:
        return self._redis

    def ping(self) -> None:
        self._call(self._redis.ping)

    def put(self, kind: BlobKind, data: bytes) -> str:
        blob_id = sha256_hex(data)
        # NX: an identical upload from a second client is a no-op.
        self._call(self._redis.set, self._key(kind, blob_id), data, nx=True)
        return blob_id

    def exists(self, kind: BlobKind, blob_id: str) -> bool:
        return bool(self._call(self._redis.exists, self._key(kind, blob_id)))

    def delete(self, kind: BlobKind, blob_id: str) -> None:
        """Drop a blob no row references any more (the caller checked)."""
        self._call(self._redis.delete, self._key(kind, blob_id))

    def size(self, kind: BlobKind, blob_id: str) -> int:
        return int(self._call(self._redis.strlen, self._key(kind, blob_id)))

    def head(self, kind: BlobKind, blob_id: str, n: int) -> bytes:
        """The first n bytes, without moving a whole key over the network."""
        return self._bytes(self._call(self._redis.getrange, self._key(kind, blob_id), 0, n - 1)) or b""

    def get(self, kind: BlobKind, blob_id: str) -> bytes:
        data = self._bytes(self._call(self._redis.get, self._key(kind, blob_id)))
        if data is None:
            raise NotFound(f"No {kind.value} blob {blob_id[:12]}… in the store.")
        if sha256_hex(data) != blob_id:
            raise NotFound(f"Blob {blob_id[:12]}… is corrupt in the store; upload it again.")
        return data

    # ---- uploads streamed in by the gateway --------------------------------------------

    @staticmethod
    def new_upload() -> str:
        return UPLOAD_PREFIX + uuid.uuid4().hex

    def append_upload(self, upload: str, chunk: bytes, ttl_s: int) -> None:
        """Add a chunk to an upload in progress; the TTL drops an abandoned one."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.append(upload, chunk)
        pipe.expire(upload, ttl_s)
        self._call(pipe.execute)

    def upload_head(self, upload: str, n: int) -> bytes:
        return self._bytes(self._call(self._redis.getrange, upload, 0, n - 1)) or b""

    def discard_upload(self, upload: str) -> None:
        self._call(self._redis.delete, upload)

    def adopt(self, upload: str, kind: BlobKind, blob_id: str) -> None:
        """Make a finished upload (or a staged artifact) the content-addressed blob ``blob_id``,
        with no TTL: a database row now owns it."""
        target = self._key(kind, blob_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.rename(upload, target)
        pipe.persist(target)
        try:
            self._call(pipe.execute)
        except redis.ResponseError as exc:
            raise UploadNotFound("The upload expired before it was used; upload it again.") from exc

    def stage(self, upload: str, account_id: str, blob_id: str, ttl_s: int) -> None:
        """Keep a finished upload as this account's staged artifact for ttl_s seconds."""
        target = self.staged_key(account_id, blob_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.rename(upload, target)
        pipe.expire(target, ttl_s)
        self._call(pipe.execute)

    def get_staged(self, account_id: str, blob_id: str) -> bytes:
        data = self._bytes(self._call(self._redis.get, self.staged_key(account_id, blob_id)))
        if data is None or sha256_hex(data) != blob_id:
            raise UploadNotFound(
                f"No staged upload {blob_id[:12]}… in this account (it expires after an hour); upload it again."
            )
        return data

    @staticmethod
    def staged_key(account_id: str, blob_id: str) -> str:
        return f"{STAGED_PREFIX}{account_id}:{blob_id}"

    # ---- query payloads --------------------------------------------------------------

    def put_payload(self, data: bytes, ttl_s: int) -> str:
        ref = uuid.uuid4().hex
        self._call(self._redis.set, PAYLOAD_PREFIX + ref, data, ex=ttl_s)
        return ref

    def get_payload(self, ref: str) -> bytes:
        """A payload by reference. Kept until its TTL: a redelivered query reads it again."""
        data = self._bytes(self._call(self._redis.get, PAYLOAD_PREFIX + ref))
        if data is None:
            raise NotFound("The query payload expired or was never stored; submit it again.")
        return data

    def delete_payload(self, ref: str) -> None:
        self._call(self._redis.delete, PAYLOAD_PREFIX + ref)

    def expire_payload(self, ref: str, ttl_s: int) -> None:
        self._call(self._redis.expire, PAYLOAD_PREFIX + ref, ttl_s)

    @staticmethod
    def _key(kind: BlobKind, blob_id: str) -> str:
        return f"{BLOB_PREFIX}{kind.value}:{blob_id}"

    @staticmethod
    def _bytes(reply: bytes | str | None) -> bytes | None:
        """A reply as the bytes it is: redis-py types replies ``bytes | str`` because a client may
        decode them, and this store's client must not (blobs are binary)."""
        if isinstance(reply, str):
            raise TypeError("The blob store needs a Redis client that does not decode responses.")
        return reply

    @staticmethod
    def _call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, a Redis command, with a lost connection or a full store
        raised as cipherpool's errors."""
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailable(f"Cannot reach the blob store: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith("OOM"):
                raise StoreFull(
                    "The platform's store is full (Redis maxmemory; nothing is evicted): try later, "
                    "or ask the operator to raise CIPHERPOOL_REDIS_MAXMEMORY_BYTES."
                ) from exc
            raise
