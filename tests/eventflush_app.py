"""A Celery app for tests/test_eventflush.py's real worker: cipherpool's consumer, events on,
the broker and the flush delay from the environment."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("eventflush", broker=os.environ["EVENTFLUSH_BROKER"])
app.conf.update(
    worker_consumer="cipherpool.workers.eventflush:Consumer",
    cipherpool_event_flush_s=float(os.environ["EVENTFLUSH_S"]),
    worker_send_task_events=True,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="eventflush.echo")
def echo(value: int, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    return value


@app.task(name="eventflush.mark")
def mark(key: str) -> None:
    """Leave ``key`` in the broker's Redis: the test knows the task ran."""
    import redis

    redis.Redis.from_url(os.environ["EVENTFLUSH_BROKER"]).set(key, b"1", ex=60)
