"""Beat's billing tick: charge what is owed, then act on the balances."""

from __future__ import annotations

import logging
from datetime import datetime

from celery import Celery

from cipherpool.billing.charging import Charged, TickReport, charge_all
from cipherpool.context import PlatformContext
from cipherpool.scheduler.credits import Enforced, enforce

log = logging.getLogger("cipherpool.billing")


def tick(
    ctx: PlatformContext, app: Celery, now: datetime | None = None, on_charged: Charged | None = None
) -> tuple[TickReport, Enforced]:
    """Charge every running worker up to now (or its node's last heartbeat, if earlier: a
    silent node is not charged) and every finished minute of shared computation, then stop the
    workers of accounts at zero and note low balances. Safe to run twice at once, or again
    after a crash: see :mod:`cipherpool.billing.charging`."""
    report = charge_all(ctx.session, ctx.store.redis, ctx.settings, now, on_charged)
    enforced = enforce(ctx, app, ctx.settings, now)
    if report.charged or report.errors:
        log.info("billing tick: %d line(s), %d micro-credits, %d error(s)", len(report.charged), report.total, len(report.errors))
    return report, enforced
