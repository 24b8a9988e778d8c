"""What each gateway does for the platform's health, in the background of its event loop:

* its own heartbeat (:mod:`cipherpool.monitoring.heartbeats`), every
  ``CIPHERPOOL_PLATFORM_HEARTBEAT_S``, removed when it stops cleanly;
* the watchdog (:mod:`cipherpool.monitoring.watchdog`), every ``CIPHERPOOL_PLATFORM_WATCHDOG_S``,
  first one interval after the start (a stack starting up is not an outage): it is what
  notices that beat or the control worker died, since neither can report its own death.

Both are asyncio tasks of the gateway's lifespan whose blocking reads run in the thread pool;
neither ever raises into the gateway: a failure is logged once per streak and tried again.
Every gateway runs the watchdog, one at a time judges (the holder of its lease); a clean stop
hands the lease over and removes the heartbeat, each bounded, so that a Redis that does not
answer cannot hold the gateway's shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from cipherpool.context import PlatformContext
from cipherpool.monitoring.heartbeats import Clock, Heartbeat, Role
from cipherpool.monitoring.watchdog import Watchdog
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.gateway")


class PlatformWatch:
    def __init__(self, ctx: PlatformContext, clock: Clock = time.time) -> None:
        self.ctx, self.clock = ctx, clock
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = Heartbeat(lambda: ctx.store.redis, Role.GATEWAY, self.instance, ctx.settings.platform_heartbeat_s, clock)
        self.watchdog = Watchdog(ctx)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> PlatformWatch:
        s = self.ctx.settings
        self._tasks = [
            asyncio.create_task(
                self._every(s.platform_heartbeat_s, self.heartbeat.beat, "heartbeat", delay=False),
                name="cipherpool-gateway-heartbeat",
            ),
            asyncio.create_task(
                self._every(s.platform_watchdog_s, self._check, "watchdog", delay=True), name="cipherpool-watchdog"
            ),
        ]
        return self

    def _check(self) -> None:
        self.watchdog.check(self.clock())

    async def _every(self, interval_s: float, step: Callable[[], None], what: str, delay: bool) -> None:
        failing = StateLog(log)
        if delay:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await run_in_threadpool(step)
                failing.up()
            except Exception:  # noqa: BLE001 - the platform's health is never the gateway's outage
                failing.down("platform %s failed; trying again every %g s", what, interval_s, exc_info=True)
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Side by side: each waits at most for the store's socket timeout when Redis is away.
        await asyncio.gather(run_in_threadpool(self.heartbeat.stop), run_in_threadpool(self._release))

    def _release(self) -> None:
        try:
            self.watchdog.release()
        except Exception:  # noqa: BLE001 - at shutdown: the lease passes on when it expires
            log.info("could not hand the platform watchdog's lease over; it passes on when it expires", exc_info=True)
