"""How late is late: one rule that turns "last heard of N seconds ago, expected every M" into
``ok``, ``late`` or ``missing`` for every part of the platform.

One rule, because the operator reads the same words for a gateway, a control worker, beat's
jobs and pool nodes, and alerts on the same thresholds. ``missing`` is three intervals, the
same as a pool node being *lost* (:data:`cipherpool.services.nodes.NODE_STALE_HEARTBEATS`):
one late heartbeat is a busy host, three are a dead one. Nothing here does I/O, and the time
is always passed in, so tests drive the clock.
"""

from __future__ import annotations

from collections.abc import Iterable

from cipherpool.statuses import ComponentState

LATE_AFTER_INTERVALS = 1.5  # later than this many intervals: late (a tick slipped, a host is busy)
MISSING_AFTER_INTERVALS = 3.0  # later than this many: missing (dead, or wedged)


def judge(age_s: float | None, interval_s: float) -> ComponentState:
    """The state of something expected every ``interval_s`` and last heard of ``age_s`` ago
    (None: never)."""
    if age_s is None or age_s > interval_s * MISSING_AFTER_INTERVALS:
        return ComponentState.MISSING
    if age_s > interval_s * LATE_AFTER_INTERVALS:
        return ComponentState.LATE
    return ComponentState.OK


def worst(states: Iterable[ComponentState]) -> ComponentState:
    """For parts that must all work (beat and each of its jobs): the worst; ok when none."""
    return max(states, key=lambda s: s.rank, default=ComponentState.OK)


def best(states: Iterable[ComponentState]) -> ComponentState:
    """For replicas, any one of which does the job (gateways, control workers, nodes): the
    best; missing when there is none at all."""
    return min(states, key=lambda s: s.rank, default=ComponentState.MISSING)
