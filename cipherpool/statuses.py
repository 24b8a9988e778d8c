"""Statuses as ``str`` enums: stored in the database, sent on the wire, shown by the CLI."""

from __future__ import annotations

from enum import Enum


class ModelStatus(str, Enum):
    DEPLOYED = "deployed"  # stored, not yet serving queries
    ACTIVE = "active"  # queries accepted
    INACTIVE = "inactive"  # deactivated by its provider; queries refused


class WorkerStatus(str, Enum):
    STARTING = "starting"  # bind sent to a node, model loading
    RUNNING = "running"  # node consumes the model's queue
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # bind failed; `error` says why

    @property
    def holds_node(self) -> bool:
        return self in (WorkerStatus.STARTING, WorkerStatus.RUNNING, WorkerStatus.STOPPING)


class NodeStatus(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"
