"""The Redis backend: every name is the Redis key it stands for, a temporary's deadline is the
key's TTL. For small setups (``CIPHERPOOL_BLOB_STORE=redis``), and what the platform stored
before backends existed, so a Redis of an older release reads as it is.

A full Redis (``maxmemory`` with ``noeviction``) refuses a write with
``OOM command not allowed when used memory > 'maxmemory'``, which redis-py raises as
:class:`redis.exceptions.OutOfMemoryError`: it is :class:`StoreFull` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import redis
from redis.exceptions import OutOfMemoryError

from cipherpool.blobs.base import full_message
from cipherpool.errors import BrokerUnavailable, StoreFull

P = ParamSpec("P")
T = TypeVar("T")
SCAN_COUNT = 500


class RedisBackend:
    kind = "redis"

    def __init__(self, client: redis.Redis):
        self.client = client

    def describe(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        return f"redis:{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def ping(self) -> None:
        call(self.client.ping)

    def put(self, name: str, data: bytes) -> None:
        call(self.client.set, name, data, nx=True)  # NX: an identical upload from a second client is a no-op

    def get(self, name: str) -> bytes | None:
        return _bytes(call(self.client.get, name))

    def exists(self, name: str) -> bool:
        return bool(call(self.client.exists, name))

    def size(self, name: str) -> int:
        return int(call(self.client.strlen, name))

    def head(self, name: str, n: int) -> bytes:
        return _bytes(call(self.client.getrange, name, 0, n - 1)) or b""

    def delete(self, name: str) -> None:
        call(self.client.delete, name)

    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        for key in call(lambda: list(self.client.scan_iter(match=prefix + "*", count=SCAN_COUNT))):
            name = key.decode() if isinstance(key, bytes) else str(key)
            size = self.size(name)
            if size:
                yield name, size

    def append(self, name: str, chunk: bytes, ttl_s: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.append(name, chunk)
        pipe.expire(name, ttl_s)
        call(pipe.execute)

    def put_temp(self, name: str, data: bytes, ttl_s: int) -> None:
        call(self.client.set, name, data, ex=ttl_s)

    def get_temp(self, name: str) -> bytes | None:
        return self.get(name)

    def expire(self, name: str, ttl_s: int) -> None:
        call(self.client.expire, name, ttl_s)

    def persist(self, temp: str, name: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.rename(temp, name)
        pipe.persist(name)
        return self._renamed(pipe)

    def move(self, temp: str, name: str, ttl_s: int) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.rename(temp, name)
        pipe.expire(name, ttl_s)
        return self._renamed(pipe)

    @staticmethod
    def _renamed(pipe: redis.client.Pipeline) -> bool:
        try:
            call(pipe.execute)
        except redis.ResponseError as exc:  # ERR no such key: expired, or never finished
            if "no such key" in str(exc).lower():
                return False
            raise
        return True

    def sweep(self) -> int:
        return 0  # Redis drops a key at its TTL

    def used_bytes(self) -> int:
        info = call(self.client.info, "memory")
        return int(info.get("used_memory", 0))


def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, a Redis command, with a lost connection or a full store raised
    as cipherpool's errors."""
    try:
        return fn(*args, **kwargs)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"Cannot reach the blob store: {exc}") from exc
    except OutOfMemoryError as exc:
        raise StoreFull(
            full_message(
                "Redis maxmemory, nothing is evicted",
                "raise CIPHERPOOL_REDIS_MAXMEMORY_BYTES or move blobs out of Redis with CIPHERPOOL_BLOB_STORE=fs or s3",
            )
        ) from exc
    except redis.ResponseError as exc:
        if str(exc).startswith("OOM"):  # a server or client that does not type it
            raise StoreFull(full_message("Redis maxmemory", str(exc))) from exc
        raise


def _bytes(reply: object) -> bytes | None:
    """A reply as the bytes it is: redis-py types replies ``bytes | str`` because a client may
    decode them, and the store's client must not (blobs are binary)."""
    if isinstance(reply, str):
        raise TypeError("The blob store needs a Redis client that does not decode responses.")
    if reply is None or isinstance(reply, bytes):
        return reply
    raise TypeError(f"Unexpected reply from Redis: {type(reply).__name__}")
