"""Celery tasks: thin wrappers over services. ``celery -A cipherpool.tasks worker`` starts a
control worker by default, a pool node with ``-Q cipherpool.pool`` (see docs/operations.md). Trusted
in-cluster code submits queries with :mod:`cipherpool.tasks.submit`."""

from cipherpool.tasks import control, node, query  # noqa: F401  (registers the tasks)
from cipherpool.tasks.app import app
from cipherpool.workers import (
    control_signals,  # noqa: F401  (control workers' and beat's heartbeats)
    signals,  # noqa: F401  (connects the handlers)
)

__all__ = ["app"]
