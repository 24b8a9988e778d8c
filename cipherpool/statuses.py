"""Statuses as ``str`` enums: stored in the database, sent on the wire, shown by the CLI."""

from __future__ import annotations

from enum import Enum


class ModelStatus(str, Enum):
    DEPLOYED = "deployed"  # stored, not yet serving queries
    ACTIVE = "active"  # queries accepted
    INACTIVE = "inactive"  # deactivated by its provider; queries refused


class WorkerStatus(str, Enum):
    """A worker's life: ``pending`` (a node claimed, told to bind) -> ``loading`` (the node
    loads the model) -> ``up`` (consuming the model's queue), or ``failed`` with the error.
    ``standby``: loaded but not consuming, resumed at once. ``stopping`` -> ``stopped``, with
    who or what stopped it (:class:`StopReason`). Stored as its value (a plain string column),
    so a new status needs no migration."""

    PENDING = "pending"
    LOADING = "loading"
    UP = "up"
    STANDBY = "standby"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def holds_node(self) -> bool:
        return self in HOLDING_NODE

    @property
    def wanted(self) -> bool:
        """Should its node keep it (bound, or about to be)? Not once stopping, stopped or failed."""
        return self in WANTED


HOLDING_NODE = frozenset(
    {WorkerStatus.PENDING, WorkerStatus.LOADING, WorkerStatus.UP, WorkerStatus.STANDBY, WorkerStatus.STOPPING}
)
WANTED = frozenset({WorkerStatus.PENDING, WorkerStatus.LOADING, WorkerStatus.UP, WorkerStatus.STANDBY})


class StopReason(str, Enum):
    """Who or what stopped a worker (``Worker.stop_reason``, the model's events)."""

    USER = "user"
    SCHEDULE = "schedule"
    CREDITS = "credits depleted"
    FAILURE = "failure"
    AUTOSCALER = "autoscaler"
    ACCOUNT_DISABLED = "account disabled"
    NODE_LOST = "node lost"


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


class KeySetStatus(str, Enum):
    """An end user's key set as ``GET /v1/client/keys`` shows it."""

    ACTIVE = "active"  # made from the serving version's client specs: queries may use it
    OUTDATED = "outdated"  # made from other client specs: generate keys again
    EXPIRED = "expired"  # unused too long, or its token expired: its evaluation key was removed; upload it again


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
    WORKER_STANDBY = "worker_standby"  # loaded, not consuming
    WORKER_RESUMED = "worker_resumed"
    WORKER_STOPPED = "worker_stopped"
    WORKER_DOWNTIME = "worker_downtime"  # its node restarted holding it: the time it was down is not charged
    CREDITS_LOW = "credits_low"  # the account's balance fell below its low-balance threshold
    CREDITS_DEPLETED = "credits_depleted"  # the balance reached zero: its workers are stopped
    TOKEN_ASSIGNED = "token_assigned"
    TOKEN_UNASSIGNED = "token_unassigned"
    ALERT_FIRED = "alert_fired"  # an alert rule's figure went above its threshold
    ALERT_CLEARED = "alert_cleared"  # ... and back to or below it (or no query to measure)
    SCHEDULE_STARTED = "schedule_started"  # a schedule's window opened: its workers were started
    SCHEDULE_STOPPED = "schedule_stopped"  # its window closed (or it was paused or removed): they were stopped
    SCHEDULE_FAILED = "schedule_failed"  # a start was refused (retried while the window is open)
    AUTOSCALED_UP = "autoscaled_up"  # the autoscaler added a worker (the reason and figures in the message)
    AUTOSCALED_DOWN = "autoscaled_down"  # ... removed one, the model being idle
    AUTOSCALE_BLOCKED = "autoscale_blocked"  # it would add one but may not (max, nodes, credit): once per episode
    REFUSALS = "refusals"  # the gateways refused requests for it (counts by code): at most one a minute


class ScheduleKind(str, Enum):
    """A worker schedule: recurring windows (two cron expressions in a time zone), or one
    reservation (from a time to a time)."""

    CRON = "cron"
    ONCE = "once"


class ScheduleActionStatus(str, Enum):
    """A schedule's start or stop for one window: ``claimed`` by one beat (the others skip it),
    then ``done``, or ``failed`` (a start is retried while its window is open), or ``skipped``
    (the window opened and closed while no beat ran)."""

    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class LedgerKind(str, Enum):
    """What a line of an account's credit ledger is. Credits in: ``grant`` (an operator's),
    ``purchase`` (through the payment provider), ``refund``; either way: ``adjustment``.
    Charges: ``runtime`` (a dedicated worker up), ``standby`` (a worker loaded on standby, at
    its profile's standby rate), ``execution`` (queries computed on shared nodes)."""

    GRANT = "grant"
    PURCHASE = "purchase"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"
    RUNTIME = "runtime"
    STANDBY = "standby"
    EXECUTION = "execution"

    @property
    def is_charge(self) -> bool:
        return self in CHARGES


CHARGES = frozenset({LedgerKind.RUNTIME, LedgerKind.STANDBY, LedgerKind.EXECUTION})


class AlertMetric(str, Enum):
    """What an alert rule compares with its threshold (:mod:`cipherpool.alerts`)."""

    AVERAGE_QUERY_S = "average_query_s"  # queue wait + compute, averaged over the rule's window
    CURRENT_QUERY_S = "current_query_s"  # the same, over the latest queries (settings.stats_recent) in the window
    QUEUE_WAIT_S = "queue_wait_s"  # the average queue wait over the window
    ERROR_RATE = "error_rate"  # failed / (computed + failed) over the window, from 0 to 1; refusals apart
    QUEUE_DEPTH = "queue_depth"  # queries waiting in the model's queue now

    @property
    def is_rate(self) -> bool:
        return self is AlertMetric.ERROR_RATE


class AlertState(str, Enum):
    OK = "ok"
    FIRING = "firing"


class AlertEventKind(str, Enum):
    FIRED = "fired"
    CLEARED = "cleared"


class WebhookDelivery(str, Enum):
    """How an alert event's webhook call went."""

    NONE = "none"  # the rule has no webhook
    PENDING = "pending"  # queued or being retried
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: attempts spent, refused by the receiver, or a refused destination


class ComponentState(str, Enum):
    """A component's health, from the age of what it last wrote against how often it writes."""

    OK = "ok"
    LATE = "late"
    MISSING = "missing"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {ComponentState.OK: 0, ComponentState.LATE: 1, ComponentState.MISSING: 2}


class Component(str, Enum):
    """The parts of the platform that `cipherpool status` judges and the watchdog watches."""

    GATEWAY = "gateway"  # HTTP gateways: heartbeat into Redis
    CONTROL = "control"  # control workers (beat's jobs run there): heartbeat into Redis
    BEAT = "beat"  # the scheduler: its own heartbeat and the age of each job's last run
    NODES = "nodes"  # pool nodes: heartbeat into the database
    STORE = "store"  # Redis (blob store; heartbeats, events): reachable or not
    DATABASE = "database"  # reachable or not
