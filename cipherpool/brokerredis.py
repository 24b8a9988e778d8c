"""kombu's Redis transport, less a Redis client object per command.

kombu's Redis channel builds a new ``redis.Redis`` (on its shared connection pool) for every
command it sends outside its event loop (``Channel.conn_or_acquire``): in the gateway, a
query's message and its ``task-sent`` event; on a node, each message's unacknowledged copy,
its acknowledgement and each flush of the worker's task events, about five a query. Each cost
about 70 us of CPU on a 2-core machine (redis-py's client sets up some 200 response callbacks
in ``__init__``), and a node's event flushes were a fifth of its Python time (py-spy). A client
on a pool holds no connection of its own and is safe to share between threads, so this channel
keeps one per pool: the same commands on the same connections, without building one per
command. A channel whose pool was replaced (after a disconnect, or in a forked child) builds a
new one.

Named by :func:`cipherpool.config.celery.broker_transport` for a plain ``redis://`` broker (one
URL, not a failover list), in every platform process (Celery's ``broker_transport``). ``rediss://`` keeps kombu's own: kombu
turns TLS on from that scheme's name, which a transport named by its class would lose.
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
