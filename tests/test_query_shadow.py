"""Every query is published under a shadow name that names its model (Flower per model, issue 10).

On kombu's in-memory broker: the message's ``task`` header stays the real task (what a node
looks the task up by) and its ``shadow`` header carries ``cipherpool.query[<model>:<id8>]``;
a worker's request built from that message takes the shadow name for events and monitoring,
yet runs the real task, which still sees its own name. Dedicated and shared queues alike.
"""

from __future__ import annotations

import pytest
from celery import Celery
from celery.worker.request import Request

from cipherpool.dispatch import publish_query, query_queue, query_shadow, shared_queue_of
from cipherpool.messages import QueryRequest
from cipherpool.names import QUERY_TASK

MODEL_ID = "0123456789abcdef"


@pytest.fixture
def app():
    app = Celery("shadow-test", broker="memory://", backend=None, set_as_current=False)
    app.conf.task_serializer = "json"
    seen: dict[str, str] = {}

    @app.task(name=QUERY_TASK, bind=True, shared=False)
    def run(self, request):
        seen.update(task=self.request.task, name=self.name, model=request["model_id"])
        return "ran"

    app.seen = seen
    yield app
    app.close()


def _take(app: Celery, queue):
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        try:
            return simple.get(timeout=2)
        finally:
            simple.close()


def test_the_shadow_name_holds_the_model_name_and_an_id_prefix():
    assert query_shadow("digits", MODEL_ID) == "cipherpool.query[digits:01234567]"
    # Two accounts' models of the same name are told apart by their ids.
    assert query_shadow("digits", "fedcba9876543210") != query_shadow("digits", MODEL_ID)


@pytest.mark.parametrize("shared", [False, True], ids=["dedicated", "shared"])
def test_a_published_query_shows_its_model_yet_runs_the_real_task(app, shared):
    request = QueryRequest(token_id="t", model_id=MODEL_ID, key_id="k" * 32, blob_id="b", input_ref="payload")

    publish_query(app, request, "cpu", 60, task_id="q-1", shared=shared, model_name="digits")

    message = _take(app, shared_queue_of("cpu") if shared else query_queue("cpu", MODEL_ID))
    assert message.headers["task"] == QUERY_TASK  # what a node's consumer picks the task by
    assert message.headers["shadow"] == "cipherpool.query[digits:01234567]"
    worker_request = Request(message, app=app)
    assert worker_request.name == "cipherpool.query[digits:01234567]"  # events, Flower, logs
    assert worker_request.task.name == QUERY_TASK
    worker_request.execute()
    assert app.seen == {"task": QUERY_TASK, "name": QUERY_TASK, "model": MODEL_ID}
