"""Heartbeats of the platform's own processes (gateways, control workers, beat), in Redis.

Pool nodes heartbeat into the database (they are rows that workers are bound to); the other
processes hold nothing in the database, and in a cluster they run on hosts that share no
filesystem, so each writes ``{host, pid, version, started, seen, interval_s}`` into one Redis
hash per role (:data:`~cipherpool.names.PROCESS_BEAT_PREFIX`), under its instance name. Any
host then reads every instance of a role in one round trip.

A clean stop removes the entry; a crash leaves it to age, so `cipherpool status` shows the
dead process as *missing* rather than forgetting it. Entries not refreshed for
:data:`FORGET_AFTER_S` are dropped by the next writer of the role (Redis 7.0 has no TTL per
hash field). Each entry carries its writer's own interval, so a reader judges it by the
writer's settings, not its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import cast

from redis import Redis

from cipherpool.names import PROCESS_BEAT_PREFIX
from cipherpool.waiting import StateLog

FORGET_AFTER_S = 3600.0  # a process silent this long is forgotten (a host scaled away, not a fault)
# How long stop() waits for a beat in flight: one that waits on a Redis that does not answer is
# bounded by the client's socket timeout (cipherpool.store.SOCKET_TIMEOUT_S), longer than a
# shutdown should wait.
STOP_WAIT_S = 5.0
log = logging.getLogger("cipherpool.monitoring")
Clock = Callable[[], float]  # unix seconds: compared across hosts


class Role(str, Enum):
    GATEWAY = "gateway"
    CONTROL = "control"
    BEAT = "beat"


@dataclass(frozen=True)
class ProcessBeat:
    """What one process last said about itself (times in unix seconds)."""

    instance: str
    host: str
    pid: int
    version: str
    started: float
    seen: float
    interval_s: float


def key(role: Role) -> str:
    return f"{PROCESS_BEAT_PREFIX}{role.value}"


def this_process(instance: str, interval_s: float, started: float, now: float) -> ProcessBeat:
    from cipherpool.version import __version__

    return ProcessBeat(instance, socket.gethostname(), os.getpid(), __version__, started, now, interval_s)


def write(redis: Redis, role: Role, beat: ProcessBeat) -> None:
    """Record ``beat`` and drop the role's entries silent for longer than FORGET_AFTER_S."""
    redis.hset(key(role), beat.instance, json.dumps(asdict(beat)))
    forgotten = [p.instance for p in read(redis, role) if beat.seen - p.seen > FORGET_AFTER_S]
    if forgotten:
        redis.hdel(key(role), *forgotten)


def remove(redis: Redis, role: Role, instance: str) -> None:
    redis.hdel(key(role), instance)


def read(redis: Redis, role: Role) -> list[ProcessBeat]:
    """Every instance of ``role`` that heartbeats or did within FORGET_AFTER_S, by name."""
    raw = cast(dict[bytes, bytes], redis.hgetall(key(role)))
    beats = []
    for value in raw.values():
        try:
            beats.append(ProcessBeat(**json.loads(value)))
        except (ValueError, TypeError):
            continue  # written by another version: not this reader's to judge
    return sorted(beats, key=lambda b: b.instance)


class Heartbeat:
    """This process's heartbeat: :meth:`beat` writes it once; :meth:`start` runs a daemon thread
    that beats every ``interval_s`` (the control worker and beat, Celery processes with no event
    loop; the gateway calls :meth:`beat` from its own loop instead). A failed write is logged
    once per streak and tried again at the next beat, never raised."""

    def __init__(
        self, redis: Callable[[], Redis], role: Role, instance: str, interval_s: float, clock: Clock = time.time
    ) -> None:
        self._redis, self.role, self.instance, self.interval_s, self._clock = redis, role, instance, interval_s, clock
        self._started = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a beat in flight never lands after stop() removed the entry
        self._failing = StateLog(log)

    def beat(self) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._beat()

    def _beat(self) -> None:
        try:
            write(self._redis(), self.role, this_process(self.instance, self.interval_s, self._started, self._clock()))
            self._failing.up()
        except Exception:  # noqa: BLE001 - a heartbeat must never take its process down
            self._failing.down("%s %s: could not write its heartbeat", self.role.value, self.instance, exc_info=True)

    def start(self) -> Heartbeat:
        self.beat()

        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.beat()

        threading.Thread(target=run, name=f"cipherpool-{self.role.value}-heartbeat", daemon=True).start()
        return self

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop beating and remove the entry: a clean stop is not a missing process.

        A beat in flight is waited for, at most ``wait_s``: Redis not answering (a partition)
        must not hang the process's shutdown. Past that the entry is left to age, as a crash
        leaves it (removed now, it could be written again by that beat when it lands)."""
        self._stop.set()  # no beat starts from now on
        if not self._lock.acquire(timeout=wait_s):
            log.warning(
                "%s %s: a heartbeat write still waits for Redis after %g s; leaving its entry to age",
                self.role.value,
                self.instance,
                wait_s,
            )
            return
        self._lock.release()
        try:
            remove(self._redis(), self.role, self.instance)
        except Exception:  # noqa: BLE001 - at shutdown, an entry left behind only ages
            log.warning("%s %s: could not remove its heartbeat", self.role.value, self.instance, exc_info=True)
