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

Its QoS writes a delivered message's unacknowledged copy (kombu's ack emulation: the copy a
dead node's message is restored from) without waiting for Redis's reply: see :class:`QoS`.

Named by :func:`cipherpool.config.celery.broker_transport` for a plain ``redis://`` broker (one
URL, not a failover list), in every platform process (Celery's ``broker_transport``). ``rediss://`` keeps kombu's own: kombu
turns TLS on from that scheme's name, which a transport named by its class would lose.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger("cipherpool.broker")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with a delivered message's unacknowledged copy sent and its reply read
    later.

    kombu writes the copy (ZADD to the unacked index, HSET of the message) with a round trip on
    the consumer's thread between ``BRPOP`` and the task's hand-over to the pool: 0.31 ms of a
    digits query's way to its node (traced). The commands here go out at the same moment, on a
    connection of the channel's own, in a MULTI/EXEC as kombu's pipeline sends them; what
    changes is only that nothing waits for their reply. Redis has them as soon as it would have;
    a node that dies now loses what it lost before.

    Everything else that reads or changes the copies first reads the replies outstanding
    (:meth:`settle`): an acknowledgement (the pool's thread), a rejection, a restore (at the
    channel's close or for a visibility timeout). So a copy is never removed before it is
    written. A reply that cannot be read (the connection broke) has the copies written again
    through kombu's own client, as kombu would have written them: the same values, so writing
    one twice is harmless.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # kombu: untyped
        self._own_lock = threading.Lock()
        self._own: Any = None  # a redis-py Connection of this channel's pool's kind
        self._own_pid = 0
        self._unread: list[tuple[str, float, str]] = []  # (delivery tag, score, copy) sent, replies unread

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        copy = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]  # kombu: untyped
        score = time.time()
        with self._own_lock:
            self._settle_locked()  # an earlier copy's reply first: by now it is there
            try:
                connection = self._connection()
                connection.send_packed_command(
                    connection.pack_commands(
                        [
                            ("MULTI",),
                            ("ZADD", self.unacked_index_key, score, delivery_tag),
                            ("HSET", self.unacked_key, delivery_tag, copy),
                            ("EXEC",),
                        ]
                    ),
                    check_health=False,  # a health check's PING would be read here, in its reply's place
                )
            except Exception:  # noqa: BLE001 - not sent: kombu's own write, reply awaited
                self._drop()
                self._write([(delivery_tag, score, copy)])
            else:
                self._unread.append((delivery_tag, score, copy))
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu: untyped

    def settle(self) -> None:
        """Read the replies outstanding (writing again what they do not confirm)."""
        with self._own_lock:
            self._settle_locked()

    def ack(self, delivery_tag: str) -> None:
        self.settle()
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # kombu: untyped

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.settle()
        super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]  # kombu: untyped

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        self.settle()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)  # type: ignore[no-untyped-call]  # kombu: untyped

    def restore_unacked(self, client: Any = None) -> None:
        self.settle()
        super().restore_unacked(client)  # type: ignore[no-untyped-call]  # kombu: untyped
        with self._own_lock:
            self._drop()

    def _settle_locked(self) -> None:
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        try:
            for _ in unread:
                replies = [self._own.read_response() for _ in range(4)]  # +OK QUEUED QUEUED [n, n]
                if not isinstance(replies[-1], list):
                    raise RuntimeError(f"the copy's transaction answered {replies[-1]!r}")
        except Exception as exc:  # noqa: BLE001 - unconfirmed: written again, the ordinary way
            log.info("unacknowledged copies not confirmed (%s): writing them again", exc)
            self._drop()
            self._write(unread)

    def _write(self, copies: list[tuple[str, float, str]]) -> None:
        with self.pipe_or_acquire() as pipe:
            for tag, score, copy in copies:
                pipe.zadd(self.unacked_index_key, {tag: score}).hset(self.unacked_key, tag, copy)
            pipe.execute()

    def _connection(self) -> Any:
        pool = self.channel.pool
        if self._own is None or self._own_pid != os.getpid():
            self._own, self._own_pid = pool.connection_class(**pool.connection_kwargs), os.getpid()
        return self._own

    def _drop(self) -> None:
        if self._own is not None and self._own_pid == os.getpid():
            self._own.disconnect()
        self._own = None


class Channel(kombu_redis.Channel):
    QoS = QoS
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
