"""The watchdog: judges every component now and then, and makes each change of state an event.

Who notices that beat is dead? Not beat, and not the control worker's jobs that beat no longer
sends. Every gateway runs this (:mod:`cipherpool.gateway.platform_watch`): gateways are always
up while the platform serves anyone, there are one or more of them, and they already hold
Redis and the database. Each change is recorded once (:func:`.platform_events.swap_state`) and
logged at ERROR by the gateway that recorded it (back to ok: WARNING). With the store down
nothing can be recorded, so each gateway logs that itself, once per outage.

Two rules keep the record from flapping:

* **One judge at a time: a lease.** The component states are one record for the platform,
  and each gateway judges from its own reads and its own clock. Two that disagree (clocks a
  few seconds apart with a job's age near the 1.5x "late" threshold, a gateway cut off from the
  database while the others reach it) would each swap in its own view at every check: an
  event and an ERROR line per flip, for as long as they disagree. Hysteresis alone would not
  stop that: each gateway would confirm its own view and the two would still alternate. So
  only the gateway holding the lease judges: a Redis key set with ``SET NX PX`` and renewed at
  each check, for :data:`LEASE_INTERVALS` watchdog intervals; a gateway that stops, crashes
  or loses Redis stops renewing it, and another takes it over within that time (a clean stop
  hands it over at once, :meth:`Watchdog.release`). The others read nothing. The judge's view
  wins: a judge cut off from the database records the database missing (it is, from there),
  once, until it reaches it again or its lease passes on.
* **A new state must hold: hysteresis.** The judge itself sees a job whose age hovers at the
  threshold (a run a little late, then on time) flip between ok and late at each check. A
  state is recorded only once judged at :data:`CONFIRM_CHECKS` checks in a row, so a change
  is news after it held for an interval, noticed one interval later (a new judge, too, judges
  that many checks before it records anything).

The swap stays atomic, so two judges for a moment (a check that outlived its lease, renewed
again before recording) still record a change once.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import cast

from redis import Redis

from cipherpool.api.schemas import PlatformEventOut, PlatformStatus
from cipherpool.context import PlatformContext
from cipherpool.monitoring import platform_events
from cipherpool.monitoring.components import read_status
from cipherpool.names import WATCHDOG_LEASE_KEY
from cipherpool.statuses import Component, ComponentState
from cipherpool.store import RETRY_ERRORS
from cipherpool.waiting import StateLog, describe_failure

log = logging.getLogger("cipherpool.platform")

CONFIRM_CHECKS = 2  # a new state is recorded once judged at this many checks in a row
LEASE_INTERVALS = 3.0  # the lease lasts this many watchdog intervals, renewed at each check
# Renew the lease if this instance holds it, else take it if nobody does: 1 when it holds it.
_TAKE_OR_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Watchdog:
    def __init__(self, ctx: PlatformContext, instance: str | None = None) -> None:
        self.ctx = ctx
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ms = max(1, round(LEASE_INTERVALS * ctx.settings.platform_watchdog_s * 1000))
        self._store_down = StateLog(log, level=logging.ERROR)
        self._streaks: dict[Component, tuple[ComponentState, int]] = {}  # judged state, checks in a row

    def check(self, now: float) -> tuple[PlatformStatus | None, list[PlatformEventOut]]:
        """Judge every component at ``now`` (unix seconds) and record what changed, if this
        gateway holds the lease (else None: another one judges)."""
        redis = self.ctx.store.redis
        try:
            leading = self._lease(redis)
        except RETRY_ERRORS as exc:
            self._unreachable(describe_failure(exc))
            return None, []
        if not leading:
            self._streaks.clear()  # judged afresh if this gateway judges again later
            self._store_down.up("platform: the store (Redis) is reachable again")
            return None, []
        status = read_status(self.ctx, now, events=0)
        if not status.store.reachable:
            self._unreachable(status.store.error or "unknown error")
            return status, []
        self._store_down.up("platform: the store (Redis) is reachable again")
        confirmed = [c for c in status.components if self._confirmed(c.component, c.state)]
        try:
            if not confirmed or not self._lease(redis):  # a check that outlived its lease records nothing
                return status, []
            return status, [
                event for c in confirmed if (event := self._record(redis, c.component, c.state, c.detail, now)) is not None
            ]
        except RETRY_ERRORS as exc:
            self._unreachable(describe_failure(exc))
            return status, []

    def release(self) -> None:
        """Hand the lease over at once (a clean stop): another gateway judges at its next check."""
        self.ctx.store.redis.eval(_RELEASE, 1, WATCHDOG_LEASE_KEY, self.instance)
        self._streaks.clear()

    def _lease(self, redis: Redis) -> bool:
        return bool(cast(int, redis.eval(_TAKE_OR_RENEW, 1, WATCHDOG_LEASE_KEY, self.instance, self.lease_ms)))

    def _confirmed(self, component: Component, state: ComponentState) -> bool:
        """Whether ``state`` was judged at CONFIRM_CHECKS checks in a row, this one included."""
        seen, count = self._streaks.get(component, (None, 0))
        count = count + 1 if seen is state else 1
        self._streaks[component] = (state, count)
        return count >= CONFIRM_CHECKS

    def _record(
        self, redis: Redis, component: Component, state: ComponentState, detail: str, now: float
    ) -> PlatformEventOut | None:
        change = platform_events.swap_state(redis, component, state)
        if change is None:
            return None
        event = platform_events.record(redis, change, detail, now)
        level = logging.WARNING if change.state is ComponentState.OK else logging.ERROR
        log.log(
            level,
            "platform: %s is %s (was %s): %s [event %d]",
            change.component.value,
            change.state.value,
            change.previous.value if change.previous else "not recorded",
            detail,
            event.id,
        )
        return event

    def _unreachable(self, error: str) -> None:
        self._streaks.clear()
        self._store_down.down(
            "platform: the store (Redis) is unreachable, so no component can be judged or event recorded: %s", error
        )
