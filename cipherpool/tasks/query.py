"""The query task: one encrypted inference on the node that serves the model."""

from __future__ import annotations

from celery.exceptions import Reject

from cipherpool.errors import CipherpoolError, ConfigurationError
from cipherpool.messages import QueryRequest, failed, ok
from cipherpool.names import TASK_PREFIX
from cipherpool.tasks.app import app
from cipherpool.tasks.envelope import log
from cipherpool.workers.context import platform
from cipherpool.workers.node import current_runtime
from cipherpool.workers.query import NotBoundHere, execute

QUERY_TASK = TASK_PREFIX + "query.run"


@app.task(name=QUERY_TASK)
def run_query(request: dict) -> dict:
    runtime = current_runtime()
    if runtime is None:
        return failed(ConfigurationError("A query reached a worker that is not a pool node."))
    try:
        return ok(execute(platform(), runtime, QueryRequest.decode(request)).encode())
    except NotBoundHere:
        # Unbound while this query was prefetched: put it back for a node serving the model.
        raise Reject("node no longer serves this model", requeue=True) from None
    except CipherpoolError as exc:
        runtime.record(ok=False)
        log.info("query refused: %s: %s", exc.code, exc.message)
        return failed(exc)
