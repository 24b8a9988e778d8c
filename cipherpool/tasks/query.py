"""The query tasks: one encrypted inference, or a batch of them, on the node that serves the model.

Thin on purpose: the whole path (decode, checks, key, compute, refusals, the requeue rule and
the hooks) is :func:`cipherpool.workers.query.handle`; this only adapts it to Celery.
"""

from __future__ import annotations

from celery import Task
from celery.exceptions import Reject

from cipherpool.context import platform
from cipherpool.errors import ConfigurationError
from cipherpool.messages import Envelope, failed
from cipherpool.names import QUERY_BATCH_TASK, QUERY_TASK
from cipherpool.tasks.app import app
from cipherpool.tasks.decorator import celery_task
from cipherpool.workers.node import current_runtime
from cipherpool.workers.query import Delivery, Requeue, handle, handle_batch


@celery_task(app, name=QUERY_TASK, bind=True)
def run_query(self: Task, request: object) -> Envelope:
    runtime = current_runtime()
    if runtime is None:
        return failed(ConfigurationError("A query reached a worker that is not a pool node."))
    try:
        return handle(platform(), runtime, request, Delivery.of(self.request))
    except Requeue as why:
        raise Reject(str(why), requeue=True) from None


@celery_task(app, name=QUERY_BATCH_TASK, bind=True)
def run_query_batch(self: Task, request: object) -> Envelope:
    """A batch of queries of one model and key set, answered item by item (one result)."""
    runtime = current_runtime()
    if runtime is None:
        return failed(ConfigurationError("A query reached a worker that is not a pool node."))
    try:
        return handle_batch(platform(), runtime, request, Delivery.of(self.request))
    except Requeue as why:
        raise Reject(str(why), requeue=True) from None
