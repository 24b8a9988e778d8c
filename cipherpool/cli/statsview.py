"""The table `cipherpool worker stats` prints: one line per model, one per worker under it.

Times are the window's averages unless the column says otherwise: QUERY is queue wait +
compute, CURRENT the average of the latest queries, WAIT and COMPUTE apart; QPM queries per
minute; ERR and REFUSED the share of attempts that failed or were refused; REFUSALS the
requests the gateways refused for the model in the window, by reason (``quota:1561,rate:3``);
KEY_HIT the share of the window's queries whose evaluation key was already deserialized in the
node's key cache, KEY_LOAD the average seconds a miss spent loading its key, KEYS the bytes of
deserialized keys resident in the worker's node (the model's line: its nodes together);
FALLBACK the share of the window's queries that came through the model's queue rather than
their key set's node (key affinity: docs/architecture.md).
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
    "key_hit",
    "key_load",
    "keys",
    "fallback",
    "refusals",
]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value}B"


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
        "key_hit": share(window.key_cache_hit_ratio),
        "key_load": seconds(window.average_key_load_s),
        "fallback": share(window.affinity_fallback_ratio),
    }


def rows(found: list[ModelStats]) -> list[dict[str, str]]:
    """The table's rows: each model, then its workers indented under it."""
    table = []
    for model in found:
        statuses = ",".join(f"{n} {s}" for s, n in sorted(model.workers_by_status.items())) or "no worker"
        resident = [w.key_bytes for w in model.workers if w.key_bytes is not None]
        table.append(
            {
                "what": model.model,
                "status": f"{model.status} ({statuses})",
                "queue": "-" if model.queue_depth is None else str(model.queue_depth),
                **_figures(model.window, model.current, model.all_time),
                "keys": size(sum(resident)) if resident else "-",
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
                    "keys": size(worker.key_bytes),
                    "refusals": "",
                }
            )
    return table


def header(found: list[ModelStats]) -> str:
    window = found[0].window_s if found else 0
    return f"window {window // 60} min (averages); current = latest queries; all_time = since recording began"
