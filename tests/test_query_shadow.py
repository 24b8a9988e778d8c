"""Every query is published under a shadow name that names its model (Flower per model, issue 10).

On kombu's in-memory broker: the message's ``task`` header stays the real task (what a node
looks the task up by) and its ``shadow`` header carries ``cipherpool.query[<model>:<id8>]``;
a worker's request built from that message takes the shadow name for events and monitoring,
yet runs the real task, which still sees its own name. Dedicated and shared queues alike. The
publisher's ``task-sent`` event carries the shadow too, so a monitor that hears it late (after
the node's ``task-received``) does not rename the query back to the bare task.
"""

from __future__ import annotations

import pytest
from celery import Celery
from celery.events.state import State
from celery.worker.request import Request
from kombu import Exchange, Queue

from cipherpool.dispatch import publish_query, query_queue, query_shadow, shared_queue_of
from cipherpool.messages import QueryRequest
from cipherpool.names import QUERY_TASK

MODEL_ID = "0123456789abcdef"
SHADOW = "cipherpool.query[digits:01234567]"
EVENTS = Queue("shadow-test-events", Exchange("celeryev", type="topic"), routing_key="task.#", auto_delete=True)


@pytest.fixture
def app():
    app = Celery("shadow-test", broker="memory://", backend=None, set_as_current=False)
    app.conf.task_serializer = "json"
    app.conf.task_send_sent_event = True  # as the platform's configuration has it
    if QUERY_TASK not in app.tasks:  # the platform's own is, where another module imported it

        @app.task(name=QUERY_TASK, bind=True, shared=False)
        def run(self, request):  # what a node's registry holds under the name; never run here
            return "ran"

    yield app
    app.close()


def _request() -> QueryRequest:
    return QueryRequest(token_id="t", model_id=MODEL_ID, key_id="k" * 32, blob_id="b", input_ref="payload")


def _take(app: Celery, queue):
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        try:
            return simple.get(timeout=2)
        finally:
            simple.close()


def test_the_shadow_name_holds_the_model_name_and_an_id_prefix():
    assert query_shadow("digits", MODEL_ID) == SHADOW
    # Two accounts' models of the same name are told apart by their ids.
    assert query_shadow("digits", "fedcba9876543210") != query_shadow("digits", MODEL_ID)


@pytest.mark.parametrize("shared", [False, True], ids=["dedicated", "shared"])
def test_a_published_query_shows_its_model_yet_runs_the_real_task(app, shared):
    publish_query(app, _request(), "cpu", 60, task_id="q-1", shared=shared, model_name="digits")

    message = _take(app, shared_queue_of("cpu") if shared else query_queue("cpu", MODEL_ID))
    assert message.headers["task"] == QUERY_TASK  # what a node's consumer picks the task by
    assert message.headers["shadow"] == SHADOW
    worker_request = Request(message, app=app)
    assert worker_request.name == SHADOW  # events, Flower, logs
    assert worker_request.task.name == QUERY_TASK
    # That the real task then runs on a node under the shadow is shown end to end by
    # tests/integration/test_flower.py (real nodes answer the shadowed queries).


def test_the_sent_event_names_the_model_so_a_late_one_renames_nothing(app):
    with app.connection_for_read() as conn:
        events = conn.SimpleQueue(EVENTS)
        try:
            publish_query(app, _request(), "cpu", 60, task_id="q-2", model_name="digits")
            sent = events.get(timeout=2).payload
        finally:
            events.close()
    assert (sent["type"], sent["uuid"], sent["name"]) == ("task-sent", "q-2", SHADOW)

    # A monitor that hears the node's events first and the publisher's task-sent last, as
    # happens when the publisher is descheduled between the message and its event:
    def monitor(late_sent: dict) -> State:
        state = State()
        node = {"hostname": "node1@h", "uuid": "q-2", "clock": 1, "local_received": 1.0}
        state.event({**node, "type": "task-received", "name": SHADOW, "timestamp": 1.0})
        state.event({**node, "type": "task-started", "timestamp": 1.1})
        state.event({**late_sent, "local_received": 1.2})
        state.event({**node, "type": "task-succeeded", "runtime": 0.1, "timestamp": 1.3})
        return state

    assert monitor(sent).tasks["q-2"].name == SHADOW
    # (Celery's own task-sent, named after the real task, would have renamed it.)
    assert monitor({**sent, "name": QUERY_TASK}).tasks["q-2"].name == QUERY_TASK
