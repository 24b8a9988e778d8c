"""The watchdog: judges every component now and then, and makes each change of state an event.

Who notices that beat is dead? Not beat, and not the control worker's jobs that beat no longer
sends. Every gateway runs this (:mod:`cipherpool.gateway.platform_watch`): gateways are always
up while the platform serves anyone, there are one or more of them, and they already hold
Redis and the database. Each change is recorded once across all gateways
(:func:`.platform_events.swap_state`) and logged at ERROR by the gateway that recorded it
(back to ok: WARNING). With the store down nothing can be recorded, so each gateway logs that
itself, once per outage.
"""

from __future__ import annotations

import logging

from cipherpool.api.schemas import PlatformEventOut, PlatformStatus
from cipherpool.monitoring import platform_events
from cipherpool.monitoring.components import read_status
from cipherpool.statuses import ComponentState
from cipherpool.workers.context import PlatformContext

log = logging.getLogger("cipherpool.platform")


class Watchdog:
    def __init__(self, ctx: PlatformContext) -> None:
        self.ctx = ctx
        self._store_down = False

    def check(self, now: float) -> tuple[PlatformStatus, list[PlatformEventOut]]:
        """Judge every component at ``now`` (unix seconds); record and log what changed."""
        status = read_status(self.ctx, now, events=0)
        if not status.store.reachable:
            if not self._store_down:
                log.error("platform: the store (Redis) is unreachable, so no component can be judged or event "
                          "recorded: %s", status.store.error)
            self._store_down = True
            return status, []
        if self._store_down:
            log.warning("platform: the store (Redis) is reachable again")
        self._store_down = False
        redis = self.ctx.store.redis
        recorded = []
        for component in status.components:
            change = platform_events.swap_state(redis, component.component, component.state)
            if change is None:
                continue
            event = platform_events.record(redis, change, component.detail, now)
            level = logging.WARNING if change.state is ComponentState.OK else logging.ERROR
            log.log(level, "platform: %s is %s (was %s): %s [event %d]", change.component.value, change.state.value,
                    change.previous.value if change.previous else "not recorded", component.detail, event.id)
            recorded.append(event)
        return status, recorded
