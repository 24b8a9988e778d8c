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
import select
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger("cipherpool.broker")


class _Copy(NamedTuple):
    tag: str
    score: float
    value: str


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with a delivered message's unacknowledged copy sent and its reply read
    later.

    kombu writes the copy (ZADD to the unacked index, HSET of the message) with a round trip on
    the consumer's thread between ``BRPOP`` and the task's hand-over to the pool: 0.31 ms of a
    digits query's way to its node (traced). The commands here go out at the same moment, in
    the MULTI/EXEC kombu's pipeline sends, on a connection of the channel's own; only the wait
    for their reply goes. Nothing is outstanding on it when a copy goes out, so anything there to
    read is Redis's close (a restart, an idle connection dropped): found then, and the copy sent
    on a new one (and kombu's health check runs as on its own connections).

    The replies are read (:meth:`settle`) before anything else reads or changes the copies: an
    acknowledgement (on the pool's thread), a rejection, a restore (a requeue, the channel's
    close, a visibility timeout), and the next copy. Redis orders nothing between two
    connections, and a copy written after its acknowledgement would run the query again once
    the visibility timeout passed. A reply that says the copy was not written, or that cannot
    be read, has the copy written again through kombu's client (the same values); one that
    cannot be written then is logged and kept for the next settle. One query's copy never fails
    another's acknowledgement, restore or copy: an acknowledgement removes its own copy (and
    forgets it, written or not), a restore raises only if its own copy cannot be written.

    What differs from kombu's: a copy Redis refuses (full) fails kombu's append on the spot;
    here the task runs and the refusal is logged at the next settle (the task's own writes meet
    the same full Redis). A key prefix (kombu's ``global_keyprefix``) keeps kombu's own write.
    The connection has no read timeout (nor have kombu's here: ``socket_timeout`` unset); with
    one, a copy whose reply timed out could still land after its acknowledgement.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # kombu: untyped
        self._own_lock = threading.RLock()  # (append settles under it)
        self._own: Any = None  # a redis-py Connection of this channel's pool's kind
        self._own_pid = 0
        self._unread: list[_Copy] = []  # sent, their replies not read yet
        self._unwritten: list[_Copy] = []  # not confirmed, and writing them again failed: the next settle's
        forked = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (method := forked()) is not None and method())

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:  # the keys kombu's client prefixes: its own write
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu: untyped
            return
        delivery = message.delivery_info
        value = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]  # kombu: untyped
        copy = _Copy(delivery_tag, time.time(), value)
        with self._own_lock:
            self._settle_quietly()  # the earlier copies' replies first (by now they are there)
            try:
                connection = self._connection()
                if connection._sock is not None and _readable(connection._sock):
                    # No reply is outstanding here: something to read is Redis's close (a restart,
                    # a dropped idle connection), found now rather than by this copy's reply.
                    self._drop()
                    connection = self._connection()
                connection.send_packed_command(
                    connection.pack_commands(
                        [
                            ("MULTI",),
                            ("ZADD", self.unacked_index_key, copy.score, copy.tag),
                            ("HSET", self.unacked_key, copy.tag, copy.value),
                            ("EXEC",),
                        ]
                    )
                )
            except Exception:  # noqa: BLE001 - not sent: kombu's own write, its reply awaited (and its error raised)
                self._drop()
                self._write([copy])
            else:
                self._unread.append(copy)
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu: untyped

    def settle(self, removing: str | None = None) -> None:
        """Read the replies outstanding; write again the copies they do not confirm (but
        ``removing``'s, whose removal follows). Raises what writing them again raised."""
        with self._own_lock:
            self._settle_locked(removing)

    def ack(self, delivery_tag: str) -> None:
        self._settle_quietly(removing=delivery_tag)
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # kombu: untyped

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            self._settle_quietly(removing=delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]  # kombu: untyped (a requeue: restore_by_tag)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """(A requeue, a restore at close or for the visibility timeout: the copy it reads
        written first. Raises only where that copy cannot be written: the restore would fail as
        kombu's does on such a Redis.)"""
        self._settle_quietly()
        with self._own_lock:
            if any(copy.tag == tag for copy in self._unwritten):
                self._settle_locked()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)  # type: ignore[no-untyped-call]  # kombu: untyped

    def close_own(self) -> None:
        """Close the copies' connection as the channel closes (after its restores: nothing is
        outstanding then but what could not be written, which is logged and dropped with the
        channel; kombu would have lost it the same way)."""
        with self._own_lock:
            try:
                self._settle_locked()
            except Exception as exc:  # noqa: BLE001 - said; the channel is gone
                log.warning("unacknowledged copies not written at the channel's close: %s", exc)
            self._drop()

    def _settle_quietly(self, removing: str | None = None) -> None:
        """Settle; a copy that cannot be written now is logged and kept for the next settle (so
        that one query's copy never fails another's acknowledgement, restore or copy)."""
        try:
            self.settle(removing=removing)
        except Exception as exc:  # noqa: BLE001 - kept in _unwritten, tried again at the next settle
            log.warning("unacknowledged copies not written (%s); tried again at the next settle", exc)

    def _after_fork_in_child(self) -> None:
        """A forked child's: the replies and copies are its parent's to settle (the parent may
        acknowledge them meanwhile), and the lock may have been held by a thread not forked."""
        self._own_lock = threading.RLock()  # (append settles under it)
        self._unread, self._unwritten, self._own = [], [], None

    def _settle_locked(self, removing: str | None = None) -> None:
        pending, self._unread = self._unread, []
        again, self._unwritten = self._unwritten, []
        read = 0
        try:
            for _copy in pending:
                self._read_transaction()
                read += 1
        except Exception as exc:  # noqa: BLE001 - not confirmed: written again below
            log.info("unacknowledged copies not confirmed (%s): writing them again", exc)
            self._drop()
            again += pending[read:]
        except BaseException:
            self._drop()
            self._unwritten = again + pending[read:]
            raise
        again = [copy for copy in again if copy.tag != removing]
        if not again:
            return
        try:
            self._write(again)
        except BaseException:
            self._unwritten = again + self._unwritten
            raise

    def _read_transaction(self) -> None:
        """MULTI's +OK, two +QUEUED, EXEC's array: an error anywhere (a refused command, a
        command failed inside EXEC) leaves the copy unconfirmed."""
        replies = [self._own.read_response() for _ in range(4)]
        done = replies[-1]
        if not isinstance(done, list) or any(isinstance(reply, Exception) for reply in done):
            raise RuntimeError(f"the copy's transaction answered {done!r}")

    def _write(self, copies: list[_Copy]) -> None:
        with self.pipe_or_acquire() as pipe:
            for copy in copies:
                pipe.zadd(self.unacked_index_key, {copy.tag: copy.score}).hset(self.unacked_key, copy.tag, copy.value)
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

    def close(self) -> None:
        try:
            super().close()  # type: ignore[no-untyped-call]  # kombu: untyped
        finally:
            if isinstance(self._qos, QoS):
                self._qos.close_own()

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


def _readable(sock: Any) -> bool:
    """Whether a socket has something to read (or hung up), without reading it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))
