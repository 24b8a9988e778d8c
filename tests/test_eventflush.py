"""A worker's task events sent together a moment after the first (cipherpool/workers/eventflush.py),
seen as Flower sees them: a real ``celery worker`` (threads pool, its event loop) on a real
Redis, its event messages read off Redis's pub/sub."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import own_redis

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ("task-received", "task-started", "task-succeeded")


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "eventflush") as found:
        yield found


def worker(url: str, flush_s: float, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVENTFLUSH_BROKER": url, "EVENTFLUSH_S": str(flush_s), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "celery", "-A", "tests.eventflush_app", "worker", "-P", "threads", "-c", "1"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"flush{flush_s}@test", "-l", "WARNING"]
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - the worker's, closed with it
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def event_messages(pubsub: redis.client.PubSub, task_id: str, until: float) -> list[list[str]]:
    """The event messages about ``task_id`` heard until ``until`` (or all three are in), each
    as the list of its event types."""
    heard: list[list[str]] = []
    while time.monotonic() < until and sum(len(m) for m in heard) < len(EVENTS):
        message = pubsub.get_message(timeout=0.2)
        if not message or message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        events = json.loads(body)
        events = events if isinstance(events, list) else [events]
        types = [e["type"] for e in events if e.get("uuid") == task_id]
        if types:
            heard.append(types)
    return heard


@pytest.mark.parametrize("flush_s", [1.0, 0.0])
def test_a_tasks_events_go_together_after_the_delay_or_as_celery_sends_them(url, tmp_path, monkeypatch, flush_s):
    """With a delay, a task of 0.2 s has its three events in one message (Celery's
    ``task.multi``); with none (Celery's own), ``task-received`` goes out as the task starts
    and ``task-succeeded`` after it. Either way every event arrives, in order."""
    monkeypatch.setenv("EVENTFLUSH_BROKER", url)
    monkeypatch.setenv("EVENTFLUSH_S", "0")
    from tests.eventflush_app import app

    app.conf.broker_url = url
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.psubscribe("/*.celeryev/task.*")
    node = worker(url, flush_s, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker is up: it answers a ping
            replies = app.control.ping(timeout=0.5, destination=[f"flush{flush_s}@test"])
            if replies:
                break
            assert node.poll() is None, (tmp_path / "worker.log").read_text()
        else:
            raise AssertionError("the worker never came up: " + (tmp_path / "worker.log").read_text())
        for _ in range(2):  # the first task warms the worker up; the second is the one measured
            result = app.send_task("eventflush.echo", args=[7, 0.2])
            assert result.id
            heard = event_messages(pubsub, result.id, time.monotonic() + 30)
        assert [t for message in heard for t in message] == list(EVENTS), heard
        if flush_s:
            assert heard == [list(EVENTS)]
        else:
            assert len(heard) >= 2 and heard[-1] == ["task-succeeded"], heard
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(10)
        pubsub.close()
        client.close()


def test_events_still_held_by_the_delay_are_sent_as_the_worker_shuts_down(url, tmp_path, monkeypatch):
    """A worker stopped within the delay after its last task sends that task's events as it
    shuts down, not never."""
    monkeypatch.setenv("EVENTFLUSH_BROKER", url)
    monkeypatch.setenv("EVENTFLUSH_S", "0")
    from tests.eventflush_app import app

    app.conf.broker_url = url
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.psubscribe("/*.celeryev/task.*")
    node = worker(url, 30.0, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5, destination=["flush30.0@test"]):
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        result = app.send_task("eventflush.mark", args=[f"ran:{tmp_path.name}"])
        ran_by = time.monotonic() + 30
        while not client.get(f"ran:{tmp_path.name}"):
            assert time.monotonic() < ran_by, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        assert event_messages(pubsub, result.id, time.monotonic() + 1) == []  # ran; its events held by the 30 s delay
        stopped = time.monotonic()
        node.send_signal(signal.SIGTERM)
        heard = event_messages(pubsub, result.id, stopped + 20)
        assert heard == [list(EVENTS)], heard
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(10)
        pubsub.close()
        client.close()


def test_what_the_delay_holds_when_the_connection_drops_goes_to_the_next_connection():
    """Celery hands a reconnected dispatcher only its predecessor's unbuffered events: the
    task events the delay still held are moved there first, each group as one message."""
    from celery import Celery
    from kombu import Connection

    from cipherpool.workers.eventflush import keep_buffered, oldest_buffered

    app = Celery("eventflush-unit", broker="memory://")
    old = app.events.Dispatcher(Connection("memory://"), hostname="n@test", buffer_group=["task"])
    assert oldest_buffered(old) is None
    before = time.time()
    old.send("task-received", uuid="q1")
    old.send("task-started", uuid="q1")
    assert before <= (oldest_buffered(old) or 0) <= time.time()
    assert keep_buffered(old) == 2 and oldest_buffered(old) is None
    new = app.events.Dispatcher(Connection("memory://"), hostname="n@test", buffer_group=["task"])
    new.extend_buffer(old)  # what Celery's Events step does on a reconnect
    ((events, routing_key),) = new._outbound_buffer
    assert routing_key == "task.multi" and [e["type"] for e in events] == ["task-received", "task-started"]
