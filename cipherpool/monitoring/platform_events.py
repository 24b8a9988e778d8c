"""Platform events: a component's state changed (beat went missing, the control worker is back).

Every gateway runs a watchdog (:mod:`cipherpool.gateway.platform_watch`); one at a time judges
and records, the holder of the watchdog's lease, and only a state it judged at several checks
in a row (:mod:`cipherpool.monitoring.watchdog` says why: gateways that judged each from its
own reads and clock made the one record flap between their views). Each component's last
recorded state is a Redis key, and the watchdog swaps in the state it judged with one atomic
``SET … GET``: only a watchdog that got back a *different* state made the change, and only it
records the event. So a lease handed over in the middle of a check still records a change
once, and a restarted gateway does not record again what was recorded before.

Events are a capped Redis list, newest first (the operator lists them with `cipherpool status
--events` or in ``GET /v1/platform/status``), each with an id from a counter that
``/metrics`` exports as ``cipherpool_platform_events_total``. The first state ever seen for a
component is recorded as an event only if it is not ok: a platform starting up is no news.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from redis import Redis

from cipherpool.api.schemas import PlatformEventOut
from cipherpool.names import COMPONENT_STATE_PREFIX, PLATFORM_EVENT_ID_KEY, PLATFORM_EVENTS_KEY
from cipherpool.statuses import Component, ComponentState

EVENTS_KEPT = 1000


@dataclass(frozen=True)
class Change:
    component: Component
    previous: ComponentState | None  # None: never recorded before
    state: ComponentState


def state_key(component: Component) -> str:
    return f"{COMPONENT_STATE_PREFIX}{component.value}"


def swap_state(redis: Redis, component: Component, state: ComponentState) -> Change | None:
    """Record ``state`` as the component's; the change if this call made one, else None
    (unchanged, or another watchdog recorded it first)."""
    old = cast(bytes | None, redis.set(state_key(component), state.value, get=True))
    previous = ComponentState(old.decode()) if old else None
    if previous == state or (previous is None and state is ComponentState.OK):
        return None
    return Change(component, previous, state)


def record(redis: Redis, change: Change, detail: str, now: float) -> PlatformEventOut:
    event_id = int(redis.incr(PLATFORM_EVENT_ID_KEY))
    event = PlatformEventOut(
        id=event_id,
        at=datetime.fromtimestamp(now, UTC),
        component=change.component,
        previous=change.previous,
        state=change.state,
        detail=detail,
    )
    pipe = redis.pipeline(transaction=True)
    pipe.lpush(PLATFORM_EVENTS_KEY, event.model_dump_json())
    pipe.ltrim(PLATFORM_EVENTS_KEY, 0, EVENTS_KEPT - 1)
    pipe.execute()
    return event


def latest(redis: Redis, limit: int) -> list[PlatformEventOut]:
    """The ``limit`` latest events, newest first."""
    if limit <= 0:
        return []
    raw = cast(list[bytes], redis.lrange(PLATFORM_EVENTS_KEY, 0, limit - 1))
    events = []
    for value in raw:
        try:
            events.append(PlatformEventOut.model_validate(json.loads(value)))
        except ValueError:
            continue
    return events


def recorded_total(redis: Redis) -> int:
    """How many events were ever recorded (the id counter)."""
    value = cast(bytes | None, redis.get(PLATFORM_EVENT_ID_KEY))
    return int(value) if value else 0
