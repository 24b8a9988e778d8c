"""The query task: one encrypted inference on the node that serves the model.

A query reaches a node only through the model's own queue. If the node was unbound while the
query was prefetched, the query goes back to that queue for a node that serves the model;
anything else a node cannot serve (a malformed message, a query that arrived through another
queue, one without a deadline) is refused with a typed result, never requeued, so no message
can bounce between nodes forever.
"""

from __future__ import annotations

from celery.exceptions import Reject

from cipherpool.errors import CipherpoolError, ConfigurationError, ModelUnavailable
from cipherpool.messages import QueryRequest, failed, ok
from cipherpool.names import TASK_PREFIX
from cipherpool.tasks.app import app
from cipherpool.tasks.envelope import log
from cipherpool.workers.context import platform
from cipherpool.workers.node import current_runtime
from cipherpool.workers.query import NotBoundHere, execute, may_requeue

QUERY_TASK = TASK_PREFIX + "query.run"


@app.task(name=QUERY_TASK, bind=True)
def run_query(self, request: dict) -> dict:
    runtime = current_runtime()
    if runtime is None:
        return failed(ConfigurationError("A query reached a worker that is not a pool node."))
    try:
        decoded = QueryRequest.decode(request)
        return ok(execute(platform(), runtime, decoded).encode())
    except NotBoundHere:
        if may_requeue(self.request, decoded.model_id):
            # Unbound while this query was prefetched: put it back for a node serving the model.
            raise Reject("node no longer serves this model", requeue=True) from None
        runtime.record(ok=False)
        return failed(ModelUnavailable("This query reached a node that does not serve its model; submit it again."))
    except CipherpoolError as exc:
        runtime.record(ok=False)
        log.info("query refused: %s: %s", exc.code, exc.message)
        return failed(exc)
