"""Writes a query's answer does not wait for (cipherpool/workers/afteranswer.py): queued per
thread while a task runs, sent in one round trip after its result is stored; a failure is
logged and dropped, never raised into the task."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import redis

from cipherpool.billing.querycounts import counts
from cipherpool.workers.afteranswer import AfterAnswer
from cipherpool.workers.hooks import QueryEvent
from cipherpool.workers.querycount import QueryCounter
from tests.helpers import own_redis


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with own_redis(tmp_path_factory, "after") as url:
        yield redis.Redis.from_url(url)


def computed(account: str = "acc", model: str = "m1") -> QueryEvent:
    query = QueryEvent(node="n1", task_id="q1", binding=None)
    query.account_id, query.model_id = account, model
    return query


def test_a_count_waits_for_the_send_and_each_thread_sends_its_own(client):
    after = AfterAnswer(lambda: client)
    counter = QueryCounter(lambda: client, after)
    today = datetime.now(UTC).date()
    queued, go, sent = threading.Event(), threading.Event(), []

    def other_task() -> None:  # another execution thread of the node, its own task
        counter.query_computed(computed("acc-b"))
        queued.set()
        go.wait(10)
        sent.append(after.send())

    other = threading.Thread(target=other_task)
    other.start()
    counter.query_computed(computed("acc-a"))
    assert queued.wait(10)
    assert counts(client, "acc-a", today) == {} and counts(client, "acc-b", today) == {}
    assert after.send() == 2  # this thread's HINCRBY and EXPIRE only
    assert counts(client, "acc-a", today) == {("m1", "shared"): 1} and counts(client, "acc-b", today) == {}
    go.set()
    other.join(10)
    assert sent == [2] and counts(client, "acc-b", today) == {("m1", "shared"): 1}


def test_without_an_after_the_count_is_written_at_once(client):
    QueryCounter(lambda: client).query_computed(computed("acc-c"))
    assert counts(client, "acc-c", datetime.now(UTC).date()) == {("m1", "shared"): 1}


def test_a_failed_send_is_logged_and_dropped(caplog):
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    after = AfterAnswer(lambda: gone)
    after.add([("DEL", "x")])
    assert after.send() == 1  # no exception reaches the task
    assert "could not write 1 commands" in caplog.text
    assert after.send() == 0  # dropped, not sent again
