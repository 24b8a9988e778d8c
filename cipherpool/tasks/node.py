"""Tasks for one pool node, sent to its own queue (``cipherpool.node.<name>``)."""

from __future__ import annotations

from cipherpool.errors import ConfigurationError
from cipherpool.names import TASK_PREFIX
from cipherpool.tasks.app import app
from cipherpool.tasks.envelope import platform_task
from cipherpool.workers import binding
from cipherpool.workers.context import platform
from cipherpool.workers.node import NodeRuntime, current_runtime

P = TASK_PREFIX + "node."


def _runtime() -> NodeRuntime:
    runtime = current_runtime()
    if runtime is None:
        raise ConfigurationError("This worker is not a pool node (start it with -Q cipherpool.pool).")
    return runtime


@platform_task(app, P + "bind")
def bind(worker_id: str) -> dict:
    return binding.bind(platform(), _runtime(), app, worker_id)


@platform_task(app, P + "unbind")
def unbind(worker_id: str) -> dict:
    return binding.unbind(platform(), _runtime(), app, worker_id)


@platform_task(app, P + "stats")
def stats() -> dict:
    return _runtime().stats()
