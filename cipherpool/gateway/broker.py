"""kombu's Redis transport for the gateway's publishes, less a Redis client object per message.

kombu's Redis channel builds a new ``redis.Redis`` (on its shared connection pool) for every
message it sends (``Channel.conn_or_acquire``): a query's message and its ``task-sent`` event,
two a query, each about 0.1 ms of gateway CPU (redis-py's client sets up its response
callbacks and more in ``__init__``). A client on a pool holds no connection of its own and is
safe to share between threads, so this channel keeps one per pool: the same commands on the
same connections, without building one per message. A channel whose pool was replaced (after a
disconnect) builds a new one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _publisher: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        publisher = self._publisher
        if publisher is None or publisher.connection_pool is not self.pool:
            publisher = self._publisher = self._create_client()  # type: ignore[no-untyped-call]  # kombu: untyped
        yield publisher


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
