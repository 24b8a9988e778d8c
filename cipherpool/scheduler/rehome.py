"""Beat's rehoming: queries waiting in the key-affinity queue of a node that no longer takes
them go to their model's own queue (:mod:`cipherpool.affinity_queues` says why and how).

Run with the reconciler, every ``CIPHERPOOL_RECONCILE_INTERVAL_S``, on both brokers, after the
workers of lost nodes were failed (so their queues count as left). A queue is watched until
``max(visibility_timeout_s, query_timeout_s) + 60`` s after a node last consumed it: a query a
dead node held comes back to it until then, and none is still waited for after.
"""

from __future__ import annotations

import logging

from celery import Celery

from cipherpool import affinity_queues
from cipherpool.affinity_queues import RescueReport
from cipherpool.context import PlatformContext

log = logging.getLogger("cipherpool.affinity")
SLACK_S = 60.0


def rehome(ctx: PlatformContext, app: Celery, now: float | None = None) -> RescueReport:
    s = ctx.settings
    if not affinity_queues.registered(ctx.store.redis):  # one round trip when nothing was ever routed
        return RescueReport()
    with ctx.session() as session:
        serving = affinity_queues.consumed(session)
    watch_s = max(float(s.visibility_timeout_s), s.query_timeout_s) + SLACK_S
    return affinity_queues.rescue(ctx.store.redis, app, serving, watch_s, now)
