"""Tasks for one pool node, sent to its own queue (``cipherpool.node.<name>``)."""

from __future__ import annotations

from cipherpool.context import platform
from cipherpool.errors import ConfigurationError
from cipherpool.names import BIND_TASK, CONSUME_TASK, RELOAD_TASK, STATS_TASK, UNBIND_TASK, WARM_TASK
from cipherpool.tasks.app import app
from cipherpool.tasks.decorator import platform_task
from cipherpool.workers import binding, query
from cipherpool.workers.binding import BindOutcome
from cipherpool.workers.node import NodeRuntime, current_runtime


def _runtime() -> NodeRuntime:
    runtime = current_runtime()
    if runtime is None:
        raise ConfigurationError("This worker is not a pool node (start it with -Q cipherpool.pool).")
    return runtime


@platform_task(app, BIND_TASK)
def bind(worker_id: str) -> BindOutcome:
    return binding.bind(platform(), _runtime(), app, worker_id)


@platform_task(app, UNBIND_TASK)
def unbind(worker_id: str) -> BindOutcome:
    return binding.unbind(platform(), _runtime(), app, worker_id)


@platform_task(app, RELOAD_TASK)
def reload(worker_id: str) -> BindOutcome:
    return binding.reload(platform(), _runtime(), worker_id)


@platform_task(app, CONSUME_TASK)
def consume(worker_id: str) -> BindOutcome:
    return binding.apply_standby(platform(), _runtime(), app, worker_id)


@platform_task(app, WARM_TASK)
def warm(request: object) -> query.Warmed:
    return query.warm(platform(), _runtime(), request)


@platform_task(app, STATS_TASK)
def stats() -> dict[str, object]:
    """The node's live figures (``cipherpool.api.schemas.WorkerStats``, as the wire carries it)."""
    return _runtime().report().model_dump(mode="json")
