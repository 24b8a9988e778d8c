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


class TokenStatus(str, Enum):
    """A token as listings show it; the first that applies, in this order."""

    REVOKED = "revoked"  # for good
    DISABLED = "disabled"  # until enabled again
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"  # its query quota is used up
    ACTIVE = "active"


class AccountStatus(str, Enum):
    ACTIVE = "active"
    DISABLED = "disabled"


class EventKind(str, Enum):
    """What a model's event log records (``cipherpool model events NAME``)."""

    DEPLOYED = "deployed"
    VERSION_ADDED = "version_added"
    ROLLOUT_STARTED = "rollout_started"  # workers load a version one at a time
    VERSION_SERVING = "version_serving"  # every worker holds it: queries use it now
    ROLLED_BACK = "rolled_back"
    SETTINGS_CHANGED = "settings_changed"
    ACTIVATED = "activated"
    DEACTIVATED = "deactivated"
    WORKER_STARTED = "worker_started"  # a node was claimed
    WORKER_LOADED_VERSION = "worker_loaded_version"
    WORKER_UP = "worker_up"
    WORKER_FAILED = "worker_failed"
    WORKER_STOPPED = "worker_stopped"
    TOKEN_ASSIGNED = "token_assigned"
    TOKEN_UNASSIGNED = "token_unassigned"
