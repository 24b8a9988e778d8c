"""The figures of Flower's Models page (:mod:`.flower_pages`), one row per model.

Two sources, each for what only it knows:

* the platform's own records (:func:`cipherpool.monitoring.stats.model_stats`: query times
  in Redis, the model's workers in the database, its queue in the broker): queries over the
  window and all-time, average query time and queue wait, the latest query, refusals and
  failures, workers up. They outlive Flower, and they are what the CLI, the API, alerts and
  the gateway's ``/metrics`` show, so the page never disagrees with them;
* Flower's event state (the task events it has heard since it started): the queries running
  now, each under its model's shadow name (:func:`cipherpool.dispatch.query_shadow`), and
  whether each serving node's heartbeats still come.

*Current query time* is the running queries' time so far (the longest, counted from when the
query was sent, as a query's time counts its queue wait), else the latest query's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from cipherpool.api.schemas import ModelStats
from cipherpool.statuses import WorkerStatus

RUNNING_STATES = frozenset({"STARTED"})  # started on a node, not finished (a prefetched one still waits)
FAILED_STATES = frozenset({"FAILURE", "REJECTED", "REVOKED"})


class Figures(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LiveQueries(Figures):
    """A model's queries as Flower's event state holds them (since Flower started, up to its
    ``--max_tasks``): in memory only, so they restart at zero with Flower."""

    task_name: str  # the shadow name its queries carry
    seen: int  # queries Flower has heard of
    succeeded: int
    failed: int  # failed, rejected or revoked (a deadline passed)
    running: int  # started on a node, not finished, within the query deadline
    running_elapsed_s: float | None  # the longest-running one's time so far, from when it was sent
    average_runtime_s: float | None  # Flower's runtime (on the node) of the succeeded ones


class ServingWorker(Figures):
    worker_id: str
    node: str | None
    status: str | None
    node_online: bool | None  # the node's heartbeats, as Flower hears them (None: never heard)
    key_bytes: int | None = None  # deserialized keys resident in its node's key cache (the node's last report)


class ModelRow(Figures):
    account: str
    model: str
    model_id: str
    status: str
    workers_up: int
    workers: list[ServingWorker]
    window_s: int
    queries_window: int
    queries_all_time: int
    queries_per_minute: float | None
    average_query_s: float | None  # queue wait + compute, over the window
    average_query_all_time_s: float | None
    current_query_s: float | None
    current_source: Literal["running", "latest"] | None
    latest_query_s: float | None
    latest_at: float | None
    recent_average_query_s: float | None  # the latest queries' average (what `worker stats` calls CURRENT)
    queue_wait_s: float | None  # the window's average
    queue_depth: int | None  # waiting in the model's queue now
    refused_window: int  # the caller's errors among the attempts (a bad ciphertext, a wrong key)
    refused_all_time: int
    refusal_rate: float | None  # the window's
    # Requests the gateway refused for the model, by error code (quota, rate, no worker...),
    # where the platform counts them (ModelStats.refusals): over the window and all-time.
    refusals_by_code: dict[str, int]
    refusals_by_code_all_time: dict[str, int]
    failed_window: int
    failed_all_time: int
    # The nodes' key cache over the window: the share of lookups that hit, the average seconds
    # a miss spent loading its key; the bytes resident in the workers' nodes together.
    key_cache_hit_ratio: float | None = None
    key_load_s: float | None = None
    key_bytes: int | None = None
    # Key affinity over the window: the share of queries that came through the model's queue
    # rather than their key set's node (None: affinity off, or nothing routed).
    affinity_fallback_ratio: float | None = None
    live: LiveQueries
    tasks_url: str  # Flower's Tasks page, filtered to this model's queries


class ModelsPage(Figures):
    at: float
    window_s: int
    last: int  # how many latest queries the recent average covers
    flower_since: float  # when this Flower started: its live figures cover what it heard since
    queries_url: str  # Flower's Tasks page, filtered to every model's queries
    models: list[ModelRow]


def tasks_url(prefix: str, name: str) -> str:
    """Flower's own Tasks page opened on a search by task name (Flower's ``?name=`` parameter
    becomes the search ``name:<value>``, a substring of the name)."""
    return f"{prefix}/tasks?name={quote(name, safe='')}"


def live_queries(task_name: str, tasks: Iterable[Any], now: float, deadline_s: float) -> LiveQueries:
    """Count a model's queries in Flower's event state (``celery.events.state.Task`` objects).

    A query whose events stopped coming (a node lost mid-query) would look running forever:
    past the query deadline nobody waits for it, so it no longer counts as running."""
    seen = succeeded = failed = running = 0
    longest: float | None = None
    runtimes: list[float] = []
    for task in tasks:
        seen += 1
        state = task.state
        if state == "SUCCESS":
            succeeded += 1
            if task.runtime is not None:
                runtimes.append(float(task.runtime))
        elif state in FAILED_STATES:
            failed += 1
        elif state in RUNNING_STATES:
            since = task.sent or task.received or task.started
            if since is None:
                continue
            elapsed = max(0.0, now - float(since))
            if elapsed <= deadline_s:
                running += 1
                longest = elapsed if longest is None else max(longest, elapsed)
    return LiveQueries(
        task_name=task_name,
        seen=seen,
        succeeded=succeeded,
        failed=failed,
        running=running,
        running_elapsed_s=longest,
        average_runtime_s=sum(runtimes) / len(runtimes) if runtimes else None,
    )


def model_row(
    account: str, stats: ModelStats, live: LiveQueries, nodes_online: Mapping[str, bool], url_prefix: str = ""
) -> ModelRow:
    """One model's row: the platform's figures, with Flower's running queries and node states."""
    current = stats.current
    source: Literal["running", "latest"] | None
    current_s: float | None
    if live.running:
        current_s, source = live.running_elapsed_s, "running"
    elif current.latest_query_s is not None:
        current_s, source = current.latest_query_s, "latest"
    else:
        current_s, source = None, None
    workers = [
        ServingWorker(
            worker_id=w.worker_id,
            node=w.node,
            status=w.status,
            node_online=nodes_online.get(w.node) if w.node else None,
            key_bytes=getattr(w, "key_bytes", None),
        )
        for w in stats.workers
    ]
    resident = [w.key_bytes for w in workers if w.key_bytes is not None]
    return ModelRow(
        account=account,
        model=stats.model,
        model_id=stats.model_id,
        status=stats.status,
        workers_up=stats.workers_by_status.get(WorkerStatus.UP.value, 0),
        workers=workers,
        window_s=stats.window_s,
        queries_window=stats.window.queries,
        queries_all_time=stats.all_time.queries,
        queries_per_minute=stats.window.queries_per_minute,
        average_query_s=stats.window.average_query_s,
        average_query_all_time_s=stats.all_time.average_query_s,
        current_query_s=current_s,
        current_source=source,
        latest_query_s=current.latest_query_s,
        latest_at=current.latest_at,
        recent_average_query_s=current.average_query_s,
        queue_wait_s=stats.window.average_queue_wait_s,
        queue_depth=stats.queue_depth,
        refused_window=stats.window.refused,
        refused_all_time=stats.all_time.refused,
        refusal_rate=stats.window.refusal_rate,
        refusals_by_code=dict(getattr(stats, "refusals", None) or {}),
        refusals_by_code_all_time=dict(getattr(stats, "refusals_all_time", None) or {}),
        failed_window=stats.window.failed,
        failed_all_time=stats.all_time.failed,
        key_cache_hit_ratio=getattr(stats.window, "key_cache_hit_ratio", None),
        key_load_s=getattr(stats.window, "average_key_load_s", None),
        key_bytes=sum(resident) if resident else None,
        affinity_fallback_ratio=getattr(stats.window, "affinity_fallback_ratio", None),
        live=live,
        tasks_url=tasks_url(url_prefix, live.task_name),
    )
