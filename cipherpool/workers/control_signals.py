"""Celery signal handlers of the processes that are not pool nodes: control workers and beat.

Each heartbeats into Redis (:mod:`cipherpool.monitoring.heartbeats`), so that `cipherpool
status`, the gateways' ``/metrics`` and their watchdog see it from any host, and see it go
missing when it dies: a control worker from ``worker_ready`` to ``worker_shutdown`` (a clean
stop removes it), beat from ``beat_init`` for as long as its process lives. A worker is a
pool node when it consumes the pool queue, as in :mod:`cipherpool.workers.signals`, which
handles those (they heartbeat into the database); it is left alone here.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import signals

from cipherpool.context import platform
from cipherpool.monitoring.heartbeats import Heartbeat, Role
from cipherpool.names import POOL_QUEUE

log = logging.getLogger("cipherpool.control")
_running: dict[Role, Heartbeat] = {}


def is_pool_node(app: Any) -> bool:
    return POOL_QUEUE in set(app.amqp.queues.consume_from or {})


def _start(role: Role, instance: str) -> None:
    ctx = platform()
    _running[role] = Heartbeat(lambda: ctx.store.redis, role, instance, ctx.settings.platform_heartbeat_s).start()


def on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    try:
        if not is_pool_node(sender.app):
            _start(Role.CONTROL, sender.hostname)
    except Exception:  # noqa: BLE001 - a worker without a heartbeat still works; status shows it missing
        log.exception("control worker heartbeat did not start")


def on_worker_shutdown(sender: Any = None, **_kwargs: Any) -> None:
    heartbeat = _running.pop(Role.CONTROL, None)
    if heartbeat is not None:
        heartbeat.stop()


def on_beat_init(sender: Any = None, **_kwargs: Any) -> None:
    try:
        _start(Role.BEAT, f"{socket.gethostname()}:{os.getpid()}")
    except Exception:  # noqa: BLE001 - beat still schedules; its jobs' ages still show
        log.exception("beat heartbeat did not start")


# weak=False: the handlers are module functions, but say it; dispatch_uid: connected once.
signals.worker_ready.connect(on_worker_ready, weak=False, dispatch_uid="cipherpool.control.ready")
signals.worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="cipherpool.control.shutdown")
signals.beat_init.connect(on_beat_init, weak=False, dispatch_uid="cipherpool.control.beat")
