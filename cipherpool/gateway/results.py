"""Waiting for task results without tying up a thread per waiting request.

Celery's Redis backend stores a task's state under ``celery-task-meta-<id>`` and publishes
it on the channel of the same name. Celery's own ``AsyncResult.get`` listens with a consumer
that is not safe to share between threads, so the gateway keeps one asyncio pub/sub
connection, subscribes to a query's channel only while someone waits for it, and reads the
key directly as well (before waiting, and every second as a fallback for a lost message).

Redis may be down when the gateway starts, or restart under it: the gateway starts anyway,
the reader subscribes (or reconnects, and redis-py subscribes again to every channel) as soon
as Redis answers, and a command on a connection that died is sent again once on a new one.
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
SUBSCRIBE_TIMEOUT_S = 5.0
RECONNECT_S = 0.5  # the reader's pause between tries while Redis does not answer
MSGPACK = "application/x-msgpack"
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


class ResultWaiter:
    def __init__(self, url: str):
        # SOCKET_TIMEOUT_S bounds the commands (a GET of a result, a PING) in a partition; the
        # reader's wait for a message has its own timeout (get_message's), so an idle
        # subscription never times out on it.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
            retry=Retry(retry_backoff(), STALE_RETRIES, supported_errors=STALE_ERRORS),
        )
        self._pubsub = self._redis.pubsub()
        # A private channel keeps the connection subscribed, so the reader always has one.
        self._private = f"cipherpool:gateway:{uuid.uuid4().hex}"
        self._futures: dict[str, set[asyncio.Future[TaskMeta]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._interrupted = StateLog(log)  # logged once per outage, not at every try

    async def start(self) -> None:
        """Start the reader; it subscribes itself, so Redis being down does not stop the
        gateway from starting (a request that needs Redis meanwhile gets broker_unavailable)."""
        self._reader = asyncio.create_task(self._read(), name="cipherpool-result-reader")

    async def ping(self) -> None:
        """A round trip on the result backend's connection (readiness)."""
        await self._redis.ping()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated
        await self._redis.aclose()

    async def meta(self, task_id: str) -> TaskMeta | None:
        return decode_meta(await self._redis.get(RESULT_META_PREFIX + task_id))

    async def keep_for(self, task_id: str, seconds: int) -> None:
        """Shorten a delivered result's life: a client's retry may read it again meanwhile."""
        await self._redis.expire(RESULT_META_PREFIX + task_id, seconds)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        """Subscribe to a task's result before it can be published (publish inside the block)."""
        channel = RESULT_META_PREFIX + task_id
        future: asyncio.Future[TaskMeta] = asyncio.get_running_loop().create_future()
        async with self._lock:
            waiting = self._futures.setdefault(channel, set())
            waiting.add(future)
            if channel not in self._confirmed:
                self._confirmed[channel] = asyncio.Event()
                try:
                    await self._pubsub.subscribe(channel)
                except RETRY_ERRORS:
                    # The subscription is reconnecting: this wait polls the key instead (as
                    # for a lost message), and does not wait for a confirmation that will not come.
                    log.info("could not subscribe to a result channel; polling it instead")
                    self._confirmed[channel].set()
            confirmed = self._confirmed[channel]
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(confirmed.wait(), SUBSCRIBE_TIMEOUT_S)
            yield Watch(self, task_id, future)
        finally:
            async with self._lock:
                waiting.discard(future)
                if not waiting:
                    self._futures.pop(channel, None)
                    self._confirmed.pop(channel, None)
                    with contextlib.suppress(Exception):
                        await self._pubsub.unsubscribe(channel)

    async def wait(self, task_id: str, timeout: float) -> TaskMeta | None:
        """The task's final state within ``timeout`` seconds, else its latest state (or None)."""
        async with self.watch(task_id) as watch:
            return await watch.result(timeout)

    async def _read(self) -> None:
        while True:
            try:
                if not self._pubsub.subscribed:  # at start, or a first subscribe that failed
                    await self._pubsub.subscribe(self._private)
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
        if message.get("type") == "subscribe":
            event = self._confirmed.get(channel)
            if event:
                event.set()
        elif message.get("type") == "message":
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
    def __init__(self, waiter: ResultWaiter, task_id: str, future: asyncio.Future[TaskMeta]):
        self._waiter, self.task_id, self._future = waiter, task_id, future

    async def result(self, timeout: float) -> TaskMeta | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            meta = await self._waiter.meta(self.task_id)
            remaining = deadline - loop.time()
            if is_ready(meta) or remaining <= 0:
                return meta
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self._future), min(remaining, FALLBACK_POLL_S))
