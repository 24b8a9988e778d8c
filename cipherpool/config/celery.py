"""The Celery configuration, derived from :class:`Settings` and nothing else.

Messages are msgpack (bytes travel as bytes, not base64) and pickle is never accepted.
Long FHE queries shape the rest: late acks with prefetch 1 so a node never hoards queries it
cannot start, redelivery when a node dies mid-query, and a visibility timeout above the
longest query so Redis does not hand a running query to a second node.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from cipherpool.config.settings import Settings, get_settings
from cipherpool.names import (
    ALERTS_TASK,
    AUTOSCALE_TASK,
    BILLING_TASK,
    CONTROL_QUEUE,
    KEY_SWEEP_TASK,
    RECONCILE_TASK,
    SCHEDULE_TASK,
)

ATOMIC_REDIS_BACKEND = "cipherpool.resultbackend:AtomicRedisBackend"
ONE_CLIENT_REDIS_TRANSPORT = "cipherpool.brokerredis:Transport"


def result_backend_url(url: str) -> str:
    """The result backend Celery loads for ``url``: a Redis one stores each task state in one
    atomic round trip (:mod:`cipherpool.resultbackend`, named in Celery's ``module:Class+url``
    form, so it is imported only where Celery makes a backend); any other is Celery's own."""
    scheme = url.partition("://")[0]
    return f"{ATOMIC_REDIS_BACKEND}+{url}" if scheme in ("redis", "rediss") else url


def broker_transport(url: str) -> str | None:
    """The kombu transport for a broker URL: for one plain ``redis://`` URL, kombu's Redis
    transport keeping one client object per channel (:mod:`cipherpool.brokerredis`); None,
    kombu's own for the URL's scheme. Not for a failover list: kombu takes each alternate's
    transport from its scheme when it switches, so the first URL alone would have it."""
    return ONE_CLIENT_REDIS_TRANSPORT if ";" not in url and url.partition("://")[0] == "redis" else None


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    # kombu sweeps for abandoned (unacknowledged) messages only every interval x throttle
    # seconds, 100 s by default; sweep a few times per visibility timeout instead.
    sweep = {
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }
    transport = broker_transport(settings.effective_broker_url())
    return {
        "broker_url": settings.effective_broker_url(),
        **({"broker_transport": transport} if transport else {}),
        "result_backend": result_backend_url(settings.effective_result_backend()),
        # A broker host that does not answer costs a connect this long, not the OS's minutes.
        "broker_transport_options": {**visibility, **sweep, "socket_connect_timeout": 5},
        "result_backend_transport_options": visibility,
        "broker_connection_retry_on_startup": True,
        # Any start order: a worker or beat started before the broker waits for it as long as it
        # takes (Celery's default gives up after 100 tries), and reconnects after an outage.
        "broker_connection_max_retries": None,
        # RabbitMQ: a node that reconnects after a partition must be able to declare its control
        # queue again while the broker still holds its old, dead connection (measured: the node
        # died with RESOURCE_LOCKED on its exclusive pidbox queue when a 70 s partition healed;
        # benchmarks/faults.py). Node names are unique, so nothing else shares that queue; and
        # a 30 s AMQP heartbeat lets the broker drop dead connections within a minute, not 4.
        "control_queue_exclusive": False,
        "broker_heartbeat": 30,
        # A publish whose connection died (a broker restart) is sent again once, on a fresh
        # connection: it never reached the broker, so this does it once. Once (Celery's
        # default is three, 0.6 s), so that with the broker down a gateway request gets
        # broker_unavailable at once rather than after a stall.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # After a broker reconnect Celery lowers the prefetch count, then restores it with a
        # blocking basic_qos from whichever pool thread acknowledges first; on RabbitMQ that thread
        # and the main thread (adding a consumer at a rebind) then read one connection at once and
        # can swallow each other's frames: the node hung until the broker dropped it (seen in
        # tests/integration/test_hosts_apart.py). Prefetch is one per slot anyway.
        "worker_enable_prefetch_count_reduction": False,
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": True,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        # Task events flushed together a moment after the first, off the task's start
        # (cipherpool/workers/eventflush.py).
        "worker_consumer": "cipherpool.workers.eventflush:Consumer",
        "cipherpool_event_flush_s": settings.event_flush_s,
        "result_expires": settings.result_expires_s,
        "result_extended": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
        # Beat's jobs run on the control queue; a tick nobody ran in time is dropped, not stacked.
        "beat_schedule": {
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.reconcile_interval_s},
            },
            # A tick that expires unrun loses nothing: the next one charges from where the last stopped.
            "billing": {
                "task": BILLING_TASK,
                "schedule": settings.billing_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.billing_interval_s},
            },
            # Each looks at the database afresh: nothing is lost when a tick expires unrun.
            "schedules": {
                "task": SCHEDULE_TASK,
                "schedule": settings.schedule_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.schedule_interval_s},
            },
            "alerts": {
                "task": ALERTS_TASK,
                "schedule": settings.alert_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.alert_interval_s},
            },
            "autoscale": {
                "task": AUTOSCALE_TASK,
                "schedule": settings.autoscale_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.autoscale_interval_s},
            },
            # Key sets' last uses, idle expiry, unreferenced blobs: each run reads the state afresh.
            "keys": {
                "task": KEY_SWEEP_TASK,
                "schedule": settings.key_sweep_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.key_sweep_interval_s},
            },
        },
    }


def create_app(settings: Settings | None = None, name: str = "cipherpool") -> Celery:
    """A Celery app for this configuration; platform processes and clients both use one."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings or get_settings()))
    return app
