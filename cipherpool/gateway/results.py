"""Waiting for task results without tying up a thread per waiting request.

Celery's Redis backend stores a task's state under ``celery-task-meta-<id>`` and publishes
it on the channel of the same name. Celery's own ``AsyncResult.get`` listens with a consumer
that is not safe to share between threads, so the gateway keeps one asyncio pub/sub
connection, subscribes to a query's channel only while someone waits for it, and reads the
key directly as well (before waiting, and every second as a fallback for a lost message).

Redis may be down when the gateway starts, or restart under it: the gateway starts anyway,
the reader subscribes (or reconnects, and redis-py subscribes again to every channel) as soon
as Redis answers, and a command on a connection that died is sent again once on a new one.
Only the reader connects: redis-py's PubSub opens its connection on whichever command finds it
down, so a request's SUBSCRIBE beside the reader's reconnect would open a second one, read by
nobody. A wait that starts while the connection is down polls the key instead, and one that
ends then drops its channel from what the reader subscribes to again.

**Its own task ids.** A subscription per task costs a SUBSCRIBE and an UNSUBSCRIBE sent, and
their two confirmations read, for every query. So each waiter also subscribes once, by pattern,
to the result channels of ids that begin with a prefix of its own (:meth:`ResultWaiter.new_id`:
a random UUID whose first 8 hex digits are the waiter's): a query given such an id is heard
with no subscription of its own, as soon as that pattern's subscription is confirmed. Every
other id (a management task's, a query another gateway submitted) is subscribed to as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeGuard

import redis.asyncio as aioredis
from celery import states
from kombu.serialization import loads
from redis import Redis
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError

from cipherpool.dispatch import reply_from_meta
from cipherpool.errors import CipherpoolError
from cipherpool.names import RESULT_META_PREFIX
from cipherpool.store import (
    CONNECT_TIMEOUT_S,
    RETRY_ERRORS,
    SOCKET_TIMEOUT_S,
    STALE_ERRORS,
    STALE_RETRIES,
    retry_backoff,
)
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.gateway")
FALLBACK_POLL_S = 1.0
ID_PREFIX_CHARS = 8  # hex digits of a waiter's own task ids that name it (32 bits: apart from other gateways')
SUBSCRIBE_TIMEOUT_S = 5.0
RECONNECT_S = 0.5  # the reader's pause between tries while Redis does not answer
CANCEL_AGAIN_S = 0.05  # how long close waits on a cancelled task before cancelling it again
KEEP_BATCH_S = 0.05  # delivered results are shortened (keep_for) together, this often at most
MSGPACK = "application/x-msgpack"
WAITER_CONNECTIONS = 100  # the asyncio client's connections to the platform's Redis (redis-py's default bound)
TaskMeta = dict[str, Any]  # Celery's stored task state: status, result, ... (as the node wrote it)


def decode_meta(raw: bytes | str | None) -> TaskMeta | None:
    """Celery's stored task state, as data (msgpack only: nothing is unpickled)."""
    if raw is None:
        return None
    meta = loads(raw, MSGPACK, "binary", accept={MSGPACK})  # type: ignore[no-untyped-call]  # kombu leaves it unannotated
    return meta if isinstance(meta, dict) else None


def is_ready(meta: TaskMeta | None) -> TypeGuard[TaskMeta]:
    return meta is not None and meta.get("status") in states.READY_STATES


def computed_by(redis: Redis, query_id: str) -> str | None:
    """The pool node that computed a finished query, read from its stored result (None if it
    is not there, or failed): the operator's view, with the platform's Redis at hand, for
    benchmarks that attribute queries to nodes. The gateway tells no end user."""
    meta = decode_meta(redis.get(RESULT_META_PREFIX + query_id))
    if not is_ready(meta):
        return None
    try:
        return reply_from_meta(meta).node or None
    except CipherpoolError:
        return None


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it has ended.

    One cancel is not always enough. redis-py sends each command through ``asyncio.wait_for``,
    which in Python 3.11 returns the command's result when a cancel meets its end, and drops
    the cancel (fixed in 3.12). A ``close`` a few milliseconds after ``start`` met the reader's
    SUBSCRIBE so, one try in a few, and waited forever: the reader read on, each read's own
    timeout answering None as usual. ``asyncio.wait`` neither raises the task's own ending nor
    swallows a cancel of the caller's, which the ``await task`` inside
    ``suppress(CancelledError)`` used before did."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)
    if not task.cancelled():
        task.exception()  # retrieved: the task logs what it meets itself


async def _as_received(message: Any) -> Any:
    """Each pub/sub message as it came. redis-py's own handler of RESP3 push messages formats
    the whole message for a debug log line before the logger is asked whether it logs: a
    164 KB result (digits) cost the gateway about 1 ms of CPU that way, 30 % of its time
    (py-spy; benchmarks/gateway_cost.py ``--output-bytes``)."""
    return message


class ResultWaiter:
    def __init__(self, url: str):
        # SOCKET_TIMEOUT_S bounds the commands (a GET of a result, a PING) in a partition; the
        # reader's wait for a message has its own timeout (get_message's), so an idle
        # subscription never times out on it.
        # A blocking pool: a burst of more requests at once than it has connections (each
        # poll reads its owner and its result here, each small query is admitted here) waits
        # for a free one, as long as a new connection's connect may take, where redis-py's
        # default pool refused the excess at once ("Too many connections": a 503 to the client).
        self._url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=WAITER_CONNECTIONS,
            timeout=CONNECT_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
            retry=Retry(retry_backoff(), STALE_RETRIES, supported_errors=STALE_ERRORS),
        )
        self._redis = aioredis.Redis.from_pool(pool)  # its own: closed with it
        self._pubsub = self._redis.pubsub(push_handler_func=_as_received)
        # A private channel keeps the connection subscribed, so the reader always has one.
        self._private = f"cipherpool:gateway:{uuid.uuid4().hex}"
        self._futures: dict[str, set[asyncio.Future[TaskMeta]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._polled: set[str] = set()  # channels whose subscribe failed: their waits poll the key
        # Ids from new_id: heard through one pattern subscription (see the module).
        self._prefix = uuid.uuid4().hex[:ID_PREFIX_CHARS]
        self._pattern = f"{RESULT_META_PREFIX}{self._prefix}*"
        self._pattern_sent = False  # PSUBSCRIBE sent (redis-py sends it again on each reconnect)
        self._pattern_live = False  # and confirmed: an id of ours needs no subscription of its own
        self._lock = asyncio.Lock()  # every PubSub command is sent under it (see _read)
        self._reader: asyncio.Task[None] | None = None
        self._keep: dict[str, int] = {}  # result keys to shorten (keep_for), and to how many seconds
        self._keeper: asyncio.Task[None] | None = None
        self._interrupted = StateLog(log)  # logged once per outage, not at every try
        self._closing = False

    async def start(self) -> None:
        """Start the reader; it subscribes itself, so Redis being down does not stop the
        gateway from starting (a request that needs Redis meanwhile gets broker_unavailable)."""
        self._closing = False
        self._reader = asyncio.create_task(self._read(), name="cipherpool-result-reader")

    async def ping(self) -> None:
        """A round trip on the result backend's connection (readiness)."""
        await self._redis.ping()

    def client_for(self, url: str) -> aioredis.Redis | None:
        """This waiter's asyncio client, lent for another round trip to the same Redis on this
        event loop (the guard's): None unless ``url`` names its Redis and its reader runs on the
        running loop (a connection belongs to the loop that opened it; a test's client may run
        requests on loops of their own)."""
        reader = self._reader
        if url != self._url or reader is None or reader.done() or reader.get_loop() is not asyncio.get_running_loop():
            return None
        return self._redis

    def new_id(self) -> str:
        """A task id (a random UUID's form) whose result this waiter hears without a
        subscription of its own: its first hex digits are this waiter's prefix. The other 90
        bits are random, as unguessable as any query id (and an id is worth nothing without the
        token that owns it)."""
        return self._prefix + str(uuid.uuid4())[ID_PREFIX_CHARS:]

    async def close(self) -> None:
        self._pattern_sent = self._pattern_live = False  # aclose drops every subscription
        self._closing = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper.get_loop() is asyncio.get_running_loop():
            await _stop(keeper)
        if self._keep:  # what was delivered is shortened now, not left to its full life
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._shorten(0), SOCKET_TIMEOUT_S)
        if self._reader is not None and self._reader.get_loop() is asyncio.get_running_loop():
            await _stop(self._reader)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated
        await self._redis.aclose()

    async def meta(self, task_id: str) -> TaskMeta | None:
        return decode_meta(await self._redis.get(RESULT_META_PREFIX + task_id))

    async def keep_for(self, task_id: str, seconds: int) -> None:
        """Shorten a delivered result's life: a client's retry may read it again meanwhile.

        Off the answer's path and in batches: the results delivered within
        :data:`KEEP_BATCH_S` are shortened together, in one pipelined round trip (a round trip
        of its own cost each answer about 0.1 ms of gateway CPU, and its latency). A result
        keeps its full life that much longer, or, if this gateway dies meanwhile or Redis
        refuses (logged), until it expires by itself: it is only memory, for a while."""
        self._keep[RESULT_META_PREFIX + task_id] = seconds
        keeper = self._keeper
        if keeper is None or keeper.done() or keeper.get_loop() is not asyncio.get_running_loop():
            self._keeper = asyncio.create_task(self._shorten(), name="cipherpool-result-expiry")

    async def _shorten(self, delay_s: float | None = None) -> None:
        await asyncio.sleep(KEEP_BATCH_S if delay_s is None else delay_s)
        while self._keep:
            batch, self._keep = self._keep, {}
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, seconds in batch.items():
                        pipe.expire(key, seconds)
                    await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - best effort: the results expire by themselves
                log.warning("could not shorten the life of %d delivered results: %s", len(batch), exc)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        """Subscribe to a task's result before it can be published (publish inside the block).

        Once the subscription is confirmed, the result of a task published inside the block
        can only arrive as a message: :meth:`Watch.result` then waits for it without reading
        the key first (a round trip that, for a query just published, finds nothing)."""
        channel = RESULT_META_PREFIX + task_id
        future: asyncio.Future[TaskMeta] = asyncio.get_running_loop().create_future()
        async with self._lock:
            waiting = self._futures.setdefault(channel, set())
            waiting.add(future)
            if self._pattern_live and task_id.startswith(self._prefix) and channel not in self._confirmed and self._connected():
                confirmed = None  # heard through the pattern: nothing to subscribe to, or to wait for
            elif channel not in self._confirmed:
                self._confirmed[channel] = asyncio.Event()
                try:
                    if not self._connected():
                        # The reader reconnects it (and subscribes again to what it holds): a
                        # SUBSCRIBE now would open a connection of its own beside the reader's,
                        # and make this request wait out a connect in an outage.
                        raise RedisConnectionError("the result subscription is reconnecting")
                    await self._pubsub.subscribe(channel)
                except RETRY_ERRORS:
                    # The subscription is reconnecting: this wait polls the key instead (as
                    # for a lost message), and does not wait for a confirmation that will not come.
                    log.info("could not subscribe to a result channel; polling it instead")
                    self._polled.add(channel)
                    self._confirmed[channel].set()
            confirmed = self._confirmed.get(channel)
        try:
            if confirmed is None:
                yield Watch(self, task_id, future, subscribed=True)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(confirmed.wait(), SUBSCRIBE_TIMEOUT_S)
                yield Watch(self, task_id, future, subscribed=confirmed.is_set() and channel not in self._polled)
        finally:
            async with self._lock:
                waiting.discard(future)
                if not waiting:
                    self._futures.pop(channel, None)
                    if self._confirmed.pop(channel, None) is not None and not self._polled_only(channel):
                        await self._unsubscribe(channel)

    def _polled_only(self, channel: str) -> bool:
        """Whether a wait on ``channel`` polled, never subscribed (forgotten as it ends)."""
        polled = channel in self._polled
        self._polled.discard(channel)
        return polled

    async def _unsubscribe(self, channel: str) -> None:
        """Drop the channel from what the reader subscribes to again when it reconnects, and
        unsubscribe on the reader's connection if it is up (an UNSUBSCRIBE while it is down
        would connect beside the reader, as a SUBSCRIBE would: see :meth:`watch`). redis-py
        drops it itself only when the confirmation comes, which a dying connection never
        brings: the channel was then subscribed to again at every reconnect, for good."""
        up = self._connected()
        for name in (channel, channel.encode()):
            self._pubsub.channels.pop(name, None)
        if up:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    def _connected(self) -> bool:
        """The reader's connection is up (the reader made it: see :meth:`_read`)."""
        connection = self._pubsub.connection
        return connection is not None and bool(connection.is_connected)

    async def wait(self, task_id: str, timeout: float) -> TaskMeta | None:
        """The task's final state within ``timeout`` seconds, else its latest state (or None).
        The task may have been published (and finished) before this subscribes: its key is
        read first."""
        async with self.watch(task_id) as watch:
            return await watch.result(timeout, read_first=True)

    async def _read(self) -> None:
        # As well as cancelled: a cancel can be lost (see _stop); and a reader that a cancelled
        # close left running ends when a start replaces it.
        while not self._closing and self._reader is asyncio.current_task():
            try:
                if self._pubsub.connection is None:
                    # The first connection, made here and outside the lock: a watch meanwhile
                    # finds none and polls (a SUBSCRIBE of its own would open a second one, read
                    # by nobody), rather than waiting on the lock for a connect in an outage.
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                if not self._pubsub.subscribed or not self._pattern_sent:
                    async with self._lock:  # the lock a watch subscribes under
                        if not self._pubsub.subscribed:  # at start, or a first subscribe that failed
                            await self._pubsub.subscribe(self._private)
                        if not self._pattern_sent:
                            await self._pubsub.psubscribe(self._pattern)
                            self._pattern_sent = True
                # On a dead connection this reconnects, and redis-py subscribes again to
                # every channel it holds; a message published meanwhile is lost, which the
                # fallback poll of each wait covers.
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarting: try again shortly
                self._interrupted.down("result subscription interrupted (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_S)
                continue
            self._interrupted.up("result subscription restored")
            if message:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        kind = message.get("type")
        if kind == "subscribe":
            event = self._confirmed.get(channel)
            if event:
                event.set()
        elif kind == "psubscribe":
            self._pattern_live = self._pattern_live or channel == self._pattern  # a pattern's confirmation names it here
        elif kind in ("message", "pmessage"):
            try:
                meta = decode_meta(message.get("data"))
            except Exception:
                log.warning("undecodable result on %s", channel)
                return
            if is_ready(meta):
                for future in self._futures.get(channel, ()):
                    if not future.done():
                        future.set_result(meta)


class Watch:
    def __init__(self, waiter: ResultWaiter, task_id: str, future: asyncio.Future[TaskMeta], subscribed: bool = False):
        self._waiter, self.task_id, self._future = waiter, task_id, future
        self.subscribed = subscribed  # the subscription was confirmed before the block ran

    async def result(self, timeout: float, *, read_first: bool | None = None) -> TaskMeta | None:
        """The task's final state within ``timeout`` seconds, else its latest state (or None).

        ``read_first``: read the key before waiting for the message. By default only when the
        subscription is not confirmed: a task published inside :meth:`ResultWaiter.watch`
        after its subscription was confirmed cannot have published its result unheard, so the
        first read would find nothing (one Redis round trip a query saved). The key is still
        read after each :data:`FALLBACK_POLL_S` without a message (a message lost while the
        subscription reconnected) and at the deadline (its latest state: queued or started)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if read_first is None:
            read_first = not self.subscribed
        if not read_first and timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self._future), min(timeout, FALLBACK_POLL_S))
        while True:
            meta = await self._waiter.meta(self.task_id)
            remaining = deadline - loop.time()
            if is_ready(meta) or remaining <= 0:
                return meta
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self._future), min(remaining, FALLBACK_POLL_S))
