"""Tasks of the control worker (``cipherpool.control`` queue), run by beat's schedule."""

from __future__ import annotations

from cipherpool import lifecycle
from cipherpool.billing.tick import tick
from cipherpool.names import BILLING_TASK, RECONCILE_TASK
from cipherpool.tasks.app import app
from cipherpool.tasks.decorator import platform_task
from cipherpool.workers.context import platform


@platform_task(app, RECONCILE_TASK)
def reconcile() -> dict[str, list[str]]:
    """Fail the workers of lost nodes and start their replacements (see lifecycle.reconcile)."""
    lost = lifecycle.reconcile(platform(), app)
    return {"failed": [w.worker_id for w in lost]}


@platform_task(app, BILLING_TASK)
def billing() -> dict[str, object]:
    """Charge running workers and shared execution; stop accounts at zero (see billing.tick)."""
    report, enforced = tick(platform(), app)
    return {"lines": len(report.charged), "charged": report.total, "errors": report.errors,
            "stopped": enforced.depleted, "low": enforced.low}
