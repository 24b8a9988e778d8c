"""SQLModel tables: the durable state of the platform.

Secrets are never stored: accounts keep the SHA-256 of their API key and tokens of their
value (both are 256-bit random strings, so a fast hash is enough; a slow password hash buys
nothing against an attacker who cannot guess 2^256 values). Ids are random hex, so ids in
queue names and URLs reveal nothing about other tenants.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from cipherpool import backends
from cipherpool.clock import utcnow
from cipherpool.names import ALERT_EVENT_ID_PREFIX, EVENT_ID_PREFIX, LEDGER_ID_PREFIX
from cipherpool.statuses import ModelStatus, NodeStatus, WorkerStatus

__all__ = ["ModelStatus", "NodeStatus", "WorkerStatus"]


class WorkerStatusType(TypeDecorator[WorkerStatus]):
    """A worker status stored as its value in a plain string column: new statuses need no
    migration (a database enum would), and the column reads back as :class:`WorkerStatus`."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else WorkerStatus(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> WorkerStatus | None:
        return None if value is None else WorkerStatus(value)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# Opaque ids of rows that an integer sequence numbers for the whole platform (docs/operations.md,
# "Security and tenancy"): what a provider is shown instead of the sequence, whose gaps would
# count other accounts' rows.


def new_event_ref() -> str:
    return EVENT_ID_PREFIX + uuid.uuid4().hex[:16]


def new_ledger_ref() -> str:
    return LEDGER_ID_PREFIX + uuid.uuid4().hex[:16]


def new_alert_event_ref() -> str:
    return ALERT_EVENT_ID_PREFIX + uuid.uuid4().hex[:16]


class Account(SQLModel, table=True):
    """A provider. Its name is a display name, not unique: a provider renaming its account
    must not learn, from a refusal, that another account has that name."""

    __tablename__ = "accounts"
    id: str = Field(default_factory=new_id, primary_key=True)
    name: str = Field(index=True)
    organisation: str | None = None
    contact_email: str | None = None
    api_key_hash: str = Field(index=True, unique=True)
    api_key_prefix: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None
    disabled_at: datetime | None = None  # set by an operator: key refused, tokens refused, workers stopped
    # The sum of its ledger in micro-credits, kept with every ledger line (in the same
    # transaction) so that a check needs no sum; the ledger stays the truth.
    balance_micro: int = Field(default=0, sa_type=BigInteger)
    low_balance_at: datetime | None = None  # when it last fell below the low-balance threshold (one event)


class Model(SQLModel, table=True):
    """A provider's model: its settings and which of its versions serves (``version``).

    ``rollout_version`` is set while workers load another version one at a time; queries keep
    using ``version`` until every running worker holds the new one, then it becomes ``version``."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("account_id", "name"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    name: str
    description: str = ""
    status: ModelStatus = ModelStatus.DEPLOYED
    hardware: str = backends.DEFAULT_HOST_CLASS  # the host class of the nodes that serve it
    min_workers: int = 0
    max_workers: int = 1
    shared: bool = False  # may run on shared pool nodes, loaded on demand, billed per execution
    node_selector: str = "{}"  # JSON object: labels a node must carry to serve it ({} = any node of its class)
    version: int = 1
    rollout_version: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ModelVersion(SQLModel, table=True):
    """One deployed artifact pair of a model, numbered from 1; kept for rollback."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    number: int
    client_blob: str  # sha256 of client.zip in the blob store
    server_blob: str  # sha256 of server.zip in the blob store
    client_size: int = 0
    server_size: int = 0
    concrete_ml_version: str
    concrete_python_version: str
    python_version: str
    input_shape: str | None = None  # JSON list, from client.zip's specs
    input_dtype: str | None = None
    backend: str = backends.DEFAULT_BACKEND  # the backend its circuit was compiled for (cipherpool.backends)
    note: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class AccessToken(SQLModel, table=True):
    """An end user's credential. Which models it may query is :class:`TokenModel`; how many
    queries it has used is counted in Redis (:mod:`cipherpool.services.usage`)."""

    __tablename__ = "access_tokens"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    name: str
    token_hash: str = Field(index=True, unique=True)
    prefix: str  # first characters, so a user can tell tokens apart in listings
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None  # for good
    disabled_at: datetime | None = None  # until enabled again
    quota: int | None = None  # queries it may run in all; None: no limit


class TokenModel(SQLModel, table=True):
    """A token's assignment to one model of its account."""

    __tablename__ = "token_models"
    token_id: str = Field(foreign_key="access_tokens.id", primary_key=True)
    model_id: str = Field(foreign_key="models.id", primary_key=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class ModelEvent(SQLModel, table=True):
    """One line of a model's event log (what happened, to which worker/version/token, why)."""

    __tablename__ = "model_events"
    id: int | None = Field(default=None, primary_key=True)  # the platform's order; never shown
    public_id: str = Field(default_factory=new_event_ref, unique=True, index=True)  # what the provider sees
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    at: datetime = Field(default_factory=utcnow)
    kind: str  # an EventKind value; a plain string so that new kinds need no migration
    message: str
    worker_id: str | None = None
    version: int | None = None
    token_id: str | None = None


class EvaluationKey(SQLModel, table=True):
    """A client key set registered under one token: its random id (what queries and
    ciphertexts name) and the content-addressed blob of its evaluation key.

    Both are needed: models without bootstrapping have one and the same 64-byte evaluation
    key for every client, so the blob's hash cannot tell two clients apart."""

    __tablename__ = "evaluation_keys"
    __table_args__ = (UniqueConstraint("token_id", "key_id"),)
    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(index=True)  # random id minted by the client with its key set
    blob_id: str  # sha256 of the serialized evaluation key in the blob store
    token_id: str = Field(foreign_key="access_tokens.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    client_blob: str = ""  # the client specs (client.zip) the key set was generated from
    size_bytes: int  # at most max_evaluation_key_bytes (512 MiB by default: an INTEGER holds 2 GiB)
    created_at: datetime = Field(default_factory=utcnow)
    # Its last query or warm-up, as beat's key sweep last flushed it from Redis (a query
    # records it there, never here): unused past CIPHERPOOL_KEY_IDLE_EXPIRY_S, it expires.
    last_used_at: datetime | None = None
    # When it expired (idle, or its token expired): kept so that a query with it is told so
    # (evaluation_key_expired), and its blob no longer counts as referenced by it.
    expired_at: datetime | None = Field(default=None, index=True)


class BlobCandidate(SQLModel, table=True):
    """A content-addressed blob that a row stopped referencing (a key set replaced, deleted or
    expired; a model deleted), marked at ``marked_at``. Beat's key sweep removes it from the
    store once it has been marked for CIPHERPOOL_BLOB_SWEEP_GRACE_S and nothing references it;
    an upload or deploy that adopts the same blob meanwhile deletes the mark in its own
    transaction (:mod:`cipherpool.services.blobs`)."""

    __tablename__ = "blob_candidates"
    kind: str = Field(primary_key=True)  # a BlobKind value: evk, client, server
    blob_id: str = Field(primary_key=True)  # sha256 hex
    marked_at: datetime = Field(default_factory=utcnow, index=True)


class PoolNode(SQLModel, table=True):
    """A persistent ``celery worker`` on the pool queue: its profile, what its host has
    (capacity) and, for a dedicated node, the one worker it holds."""

    __tablename__ = "pool_nodes"
    name: str = Field(primary_key=True)  # the Celery node name, e.g. node1@host
    host_class: str = backends.DEFAULT_HOST_CLASS
    concurrency: int = 1  # execution slots
    threads: int | None = None
    status: NodeStatus = NodeStatus.ONLINE
    worker_id: str | None = None  # the binding that holds this node; claimed atomically
    pid: int | None = None
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)
    profile: str = "default"  # its profile's name (profiles.toml), "default" without one
    labels: str = "{}"  # JSON object of its profile's labels
    shared: bool = False  # loads models on demand for queries of models that allow it
    host: str = ""
    cores: int = 0  # capacity, as the node saw its host when it registered
    memory_bytes: int = Field(default=0, sa_type=BigInteger)
    gpus: int = 0
    # JSON list of the backends whose probe passed on it when it registered (cipherpool.backends)
    capabilities: str = json.dumps([backends.DEFAULT_BACKEND])
    key_cache_bytes: int = Field(default=0, sa_type=BigInteger)


class Worker(SQLModel, table=True):
    """A model bound to a pool node: what `start_worker` creates and `stop_worker` ends."""

    __tablename__ = "workers"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    node_name: str = Field(foreign_key="pool_nodes.name", index=True)
    status: WorkerStatus = Field(default=WorkerStatus.PENDING, sa_type=WorkerStatusType)
    profile: str | None = None  # the node profile asked for, if any
    standby: bool = False  # kept loaded but not consuming (resumed at once)
    version: int | None = None  # the newest model version this worker has loaded
    error: str | None = None
    stop_reason: str | None = None  # who or what stopped it: user, account disabled, ...
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    # Billing: charged up to here, and what fell short of a whole micro-credit (in
    # micro-credit-milliseconds per hour), carried so that splitting never changes a total.
    billed_to: datetime | None = None
    billed_remainder: int = Field(default=0, sa_type=BigInteger)
    # Who started it: user, schedule (``schedule_id`` names which), autoscaler, reconciler.
    started_by: str = "user"
    schedule_id: str | None = Field(default=None, index=True)


class Rate(SQLModel, table=True):
    """A price from a moment on: a host class's (``scope`` cpu, gpu) or a node profile's
    (``profile:NAME``; a None field takes its class's). In micro-credits per hour (runtime,
    standby) and per second of computation (shared nodes). Rows are only added: a charge for
    a period prices each part of it at the row in force then."""

    __tablename__ = "rates"
    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(index=True)
    effective_from: datetime = Field(default_factory=utcnow, index=True)
    runtime_per_hour: int | None = Field(default=None, sa_type=BigInteger)
    standby_per_hour: int | None = Field(default=None, sa_type=BigInteger)
    execution_per_s: int | None = Field(default=None, sa_type=BigInteger)
    source: str = ""  # settings, a profiles file, an operator


class LedgerEntry(SQLModel, table=True):
    """One line of an account's credit ledger; lines are never changed or deleted.

    ``amount`` is signed micro-credits (a charge is negative) and ``balance_after`` the sum
    of the account's lines up to this one. ``key`` is unique: a charge is keyed by what it
    charges (a worker and the start of its period; an account, model and minute of shared
    execution), so a tick run twice, two beats or a retry after a crash cannot charge it
    twice: the database refuses the second line."""

    __tablename__ = "ledger"
    id: int | None = Field(default=None, primary_key=True)  # the platform's order; never shown
    public_id: str = Field(default_factory=new_ledger_ref, unique=True, index=True)  # what the account sees
    account_id: str = Field(foreign_key="accounts.id", index=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    kind: str = Field(index=True)  # a LedgerKind value
    amount: int = Field(sa_type=BigInteger)
    balance_after: int = Field(sa_type=BigInteger)
    key: str = Field(unique=True)
    model_id: str | None = Field(default=None, index=True)  # no foreign keys: the ledger outlives what it names
    worker_id: str | None = Field(default=None, index=True)
    node: str | None = None
    period_start: datetime | None = Field(default=None, index=True)
    period_end: datetime | None = None
    quantity_ms: int | None = Field(default=None, sa_type=BigInteger)  # runtime or computation charged
    queries: int | None = None  # shared-node executions charged
    rate: int | None = Field(default=None, sa_type=BigInteger)  # micro-credits per hour (or per s: execution)
    reference: str | None = None  # an invoice or payment reference
    note: str = ""


class Invoice(SQLModel, table=True):
    """One purchase: what was bought, under which idempotency key, what the payment provider
    made of it (its reference and status) and whether the credits were added. Recorded before
    the provider is asked, so a retry finds it and is never paid twice."""

    __tablename__ = "invoices"
    id: str = Field(primary_key=True)  # e.g. INV-20261122-1a2b3c4d5e6f
    account_id: str = Field(foreign_key="accounts.id", index=True)
    key: str = Field(unique=True)  # purchase:<account>:<idempotency key>
    amount: int = Field(sa_type=BigInteger)  # micro-credits bought
    status: str = "pending"  # pending (payment not confirmed), open (to be paid offline), paid, void
    credited: bool = False  # its ledger line was added
    provider: str = ""
    reference: str | None = None  # the payment provider's
    created_at: datetime = Field(default_factory=utcnow)
    note: str = ""


class Schedule(SQLModel, table=True):
    """When a model wants workers: a recurring window (``start_cron`` to ``stop_cron`` in
    ``timezone``) or a one-off reservation (``starts_at`` to ``ends_at``). While a window is
    open the schedule keeps ``workers`` of its own running; they stop when it closes."""

    __tablename__ = "schedules"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    name: str = ""
    kind: str = "cron"  # a ScheduleKind value: cron (recurring) or once (a reservation)
    start_cron: str | None = None  # five-field cron expressions, read in ``timezone``
    stop_cron: str | None = None
    timezone: str = "UTC"  # an IANA name, e.g. Europe/Paris
    starts_at: datetime | None = None  # a reservation's window, in UTC
    ends_at: datetime | None = None
    workers: int = 1
    profile: str | None = None
    paused: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ScheduleAction(SQLModel, table=True):
    """A start or stop a schedule applied to one of its windows. The unique (schedule, window,
    action) lets only one beat claim it, so no action is applied twice, even with two beats."""

    __tablename__ = "schedule_actions"
    __table_args__ = (UniqueConstraint("schedule_id", "window_start", "action"),)
    id: int | None = Field(default=None, primary_key=True)
    schedule_id: str = Field(foreign_key="schedules.id", index=True)
    window_start: datetime
    action: str  # start | stop
    status: str = "claimed"  # claimed, done, failed (retried while the window is open), skipped
    attempts: int = 1
    at: datetime = Field(default_factory=utcnow)
    message: str = ""


class AlertRule(SQLModel, table=True):
    """A threshold on one of a model's query figures (``metric``, over ``window_s``). Beat
    evaluates it: crossing it fires (an event, a webhook call), going back under clears it."""

    __tablename__ = "alert_rules"
    __table_args__ = (UniqueConstraint("model_id", "metric"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    metric: str  # an AlertMetric value
    threshold: float
    window_s: int = 300
    webhook_url: str | None = None
    webhook_secret: str | None = None  # signs the webhook's body (HMAC-SHA256); shown to its owner once
    state: str = "ok"  # ok | firing
    value: float | None = None  # the figure at the last evaluation
    evaluated_at: datetime | None = None
    changed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AlertEvent(SQLModel, table=True):
    """An alert fired or cleared, and how its webhook call went (kept after its rule is removed)."""

    __tablename__ = "alert_events"
    id: int | None = Field(default=None, primary_key=True)  # the platform's order; never shown
    public_id: str = Field(default_factory=new_alert_event_ref, unique=True, index=True)  # what the provider sees
    rule_id: str = Field(index=True)  # no foreign key: the history outlives the rule
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    metric: str
    kind: str  # fired | cleared
    value: float | None = None
    threshold: float
    at: datetime = Field(default_factory=utcnow, index=True)
    delivery: str = "none"  # none (no webhook), pending, delivered, failed
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None


class AutoscalePolicy(SQLModel, table=True):
    """Opt-in autoscaling of one model between its ``min_workers`` and ``max_workers``."""

    __tablename__ = "autoscale_policies"
    model_id: str = Field(foreign_key="models.id", primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    enabled: bool = True
    target_queue_wait_s: float | None = 5.0  # add a worker when the average queue wait stays above this
    target_queue_depth: int | None = None  # ... or the queries waiting per worker stay above this
    scale_up_after_s: float = 30.0  # how long above target before adding
    idle_after_s: float = 300.0  # no query and an empty queue this long: remove one
    cooldown_up_s: float = 60.0  # at least this long after any change before adding
    cooldown_down_s: float = 300.0  # ... before removing
    above_since: datetime | None = None
    idle_since: datetime | None = None
    last_scaled_at: datetime | None = None
    last_action: str | None = None  # up | down, with last_reason
    last_reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
