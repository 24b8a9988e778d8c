"""The table `cipherpool worker stats` prints: one line per model, one per worker under it.

Times are the window's averages unless the column says otherwise: QUERY is queue wait +
compute, CURRENT the average of the latest queries, WAIT and COMPUTE apart; QPM queries per
minute; ERR and REFUSED the share of attempts that failed or were refused; REFUSALS the
requests the gateways refused for the model in the window, by reason (``quota:1561,rate:3``).
"""

from __future__ import annotations

from collections.abc import Mapping

from cipherpool.api.schemas import CurrentFigures, ModelStats, TimingFigures
from cipherpool.monitoring.refusals import by_reason

COLUMNS = [
    "what",
    "status",
    "queue",
    "queries",
    "qpm",
    "query",
    "current",
    "wait",
    "compute",
    "all_time",
    "err",
    "refused",
    "refusals",
]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def refusals(counts: Mapping[str, int]) -> str:
    """Refusals by reason, the most first: ``quota:1561,rate:3``."""
    found = sorted(by_reason(counts).items(), key=lambda item: -item[1])
    return ",".join(f"{reason}:{n}" for reason, n in found) or "-"


def _figures(window: TimingFigures, now: CurrentFigures, all_time: TimingFigures) -> dict[str, str]:
    return {
        "queries": str(window.queries),
        "qpm": "-" if window.queries_per_minute is None else f"{window.queries_per_minute:.1f}",
        "query": seconds(window.average_query_s),
        "current": seconds(now.average_query_s),
        "wait": seconds(window.average_queue_wait_s),
        "compute": seconds(window.average_compute_s),
        "all_time": seconds(all_time.average_query_s),
        "err": share(window.error_rate),
        "refused": share(window.refusal_rate),
    }


def rows(found: list[ModelStats]) -> list[dict[str, str]]:
    """The table's rows: each model, then its workers indented under it."""
    table = []
    for model in found:
        statuses = ",".join(f"{n} {s}" for s, n in sorted(model.workers_by_status.items())) or "no worker"
        table.append(
            {
                "what": model.model,
                "status": f"{model.status} ({statuses})",
                "queue": "-" if model.queue_depth is None else str(model.queue_depth),
                **_figures(model.window, model.current, model.all_time),
                "refusals": refusals(model.refusals),
            }
        )
        for worker in model.workers:
            where = f"{worker.worker_id}@{worker.node}" if worker.node else worker.worker_id
            table.append(
                {
                    "what": f"  {where}",
                    "status": worker.status or "-",
                    "queue": "",
                    **_figures(worker.window, worker.current, worker.all_time),
                    "refusals": "",
                }
            )
    return table


def header(found: list[ModelStats]) -> str:
    window = found[0].window_s if found else 0
    return f"window {window // 60} min (averages); current = latest queries; all_time = since recording began"
