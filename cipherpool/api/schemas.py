"""Request and response bodies of the gateway's HTTP API (``/v1``), as pydantic models.

The gateway declares them on its routes (so they are the OpenAPI page) and the Python clients
parse every answer with them, so the wire contract lives here and nowhere else. Keys,
ciphertexts and deployment zips are not JSON: they travel as ``application/octet-stream``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cipherpool import backends
from cipherpool.names import ALERT_EVENT_ID_PREFIX, EVENT_ID_PREFIX, LEDGER_ID_PREFIX
from cipherpool.statuses import (
    AccountStatus,
    AlertEventKind,
    AlertMetric,
    AlertState,
    Component,
    ComponentState,
    KeySetStatus,
    LedgerKind,
    ModelStatus,
    ScheduleActionStatus,
    ScheduleKind,
    TokenStatus,
    WebhookDelivery,
    WorkerStatus,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HOST_CLASS_PATTERN = backends.host_class_pattern()  # a model's hardware: the host classes of the backends
ID_PATTERN = r"^[0-9a-f]{16}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
EMAIL_PATTERN = r"^[^@\s]{1,64}@[^@\s]{1,190}$"
DEFAULT_TOKEN_TTL_S = 30 * 86400  # as hosted platforms do: a token expires unless told otherwise
MAX_TOKEN_TTL_S = 10 * 365 * 86400
MAX_WORKERS = 1000
KEY_ID_PATTERN = r"^[0-9a-f]{32}$"
QUERY_ID_PATTERN = r"^[0-9a-f-]{36}$"
# Opaque ids of model events, ledger lines and alert events (the platform's integer sequence
# behind them is never shown: its gaps would count other accounts' rows).
EVENT_ID_PATTERN = rf"^{EVENT_ID_PREFIX}[0-9a-f]{{16}}$"
LEDGER_ID_PATTERN = rf"^{LEDGER_ID_PREFIX}[0-9a-f]{{16}}$"
ALERT_EVENT_ID_PATTERN = rf"^{ALERT_EVENT_ID_PREFIX}[0-9a-f]{{16}}$"
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # a node label's key or value (profiles.toml)
Labels = dict[Annotated[str, StringConstraints(pattern=LABEL_PATTERN)], Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]]


class Wire(BaseModel):
    """Unknown fields are refused: a typo in a request is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(Wire):
    code: str
    message: str


class Health(Wire):
    status: str
    version: str


class ReadinessCheck(Wire):
    """One part the gateway needs, as ``GET /v1/ready`` found it just now (or, for the
    schema, within the settings' ready_schema_cache_s). ``detail`` names no host or password:
    the endpoint is public, and the gateway's log has the masked URL."""

    ok: bool
    detail: str
    elapsed_ms: float
    # The store (or the broker's Redis) is full: writes are refused with 507 store_full, while
    # reads, polls and deletes are served, so the gateway stays ready (``status`` "degraded").
    full: bool = False


class ReadyBody(Wire):
    """200 from ``GET /v1/ready``: every part answered (``status`` is ``ready``, or ``degraded``
    while a check is ``full``: uploads and queries get 507 store_full, the rest is served)."""

    status: str
    checks: dict[str, ReadinessCheck]


class NotReadyBody(Wire):
    """503 from ``GET /v1/ready``: the typed error (``not_ready``), its message naming each
    failing part, and every check."""

    code: str
    message: str
    checks: dict[str, ReadinessCheck]


# ---- provider (API key) ----------------------------------------------------------------


class UploadOut(Wire):
    """A staged deployment artifact: referenced by a deploy within ``expires_in_s``."""

    upload_id: str = Field(pattern=SHA256_PATTERN)
    size_bytes: int
    expires_in_s: int


class AccountOut(Wire):
    id: str
    name: str
    organisation: str | None
    contact_email: str | None
    status: AccountStatus
    api_key_prefix: str
    created_at: str
    updated_at: str | None


class AccountCreated(AccountOut):
    api_key: str  # the clear value, shown once


class AccountUpdate(Wire):
    """Provider-editable details; a field left out is unchanged, ``null`` clears it."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    organisation: str | None = Field(None, max_length=200)
    contact_email: str | None = Field(None, pattern=EMAIL_PATTERN)


class ApiKeyRotated(Wire):
    api_key: str  # the new clear value, shown once; the old key stopped working
    api_key_prefix: str


class ModelSettings(Wire):
    """A model's settings, as deploy takes them and update changes them (a field left out is
    unchanged). ``min_workers``/``max_workers`` bound how many workers it may have; ``shared``:
    it may run on shared pool nodes."""

    description: str | None = Field(None, max_length=2000)
    hardware: str | None = Field(None, pattern=HOST_CLASS_PATTERN)
    min_workers: int | None = Field(None, ge=0, le=MAX_WORKERS)
    max_workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    shared: bool | None = None
    node_selector: Labels | None = Field(None, max_length=16, description="labels a node must carry to serve it")


class DeployIn(Wire):
    name: str = Field(pattern=NAME_PATTERN)
    client_upload: str = Field(pattern=SHA256_PATTERN)
    server_upload: str = Field(pattern=SHA256_PATTERN)
    hardware: str = Field(backends.DEFAULT_HOST_CLASS, pattern=HOST_CLASS_PATTERN)
    description: str = Field("", max_length=2000)
    min_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    max_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    shared: bool = False
    node_selector: Labels = Field(default_factory=dict, max_length=16)


class VersionIn(Wire):
    """A new version of a model's artifact (staged uploads), rolled out to its workers."""

    client_upload: str = Field(pattern=SHA256_PATTERN)
    server_upload: str = Field(pattern=SHA256_PATTERN)
    note: str = Field("", max_length=500)


class RollbackIn(Wire):
    version: int | None = Field(None, ge=1, description="default: the version before the serving one")


class VersionOut(Wire):
    number: int
    serving: bool  # the version queries use now
    rolling_out: bool  # workers are loading it
    client_sha256: str
    client_size: int
    server_sha256: str
    server_size: int
    concrete_ml: str
    concrete_python: str
    python: str
    input_shape: list[int] | None
    input_dtype: str | None
    backend: str = backends.DEFAULT_BACKEND  # the backend its circuit was compiled for (cipherpool.backends)
    note: str
    created_at: str


class ModelOut(Wire):
    id: str
    name: str
    status: ModelStatus
    hardware: str
    version: int  # the serving version
    rollout_version: int | None
    description: str
    min_workers: int
    max_workers: int
    shared: bool
    node_selector: dict[str, str] = {}
    concrete_ml: str
    concrete_python: str
    created_at: str
    updated_at: str


class ModelDetail(ModelOut):
    """``model show``: the settings, every version, the serving artifact, running workers."""

    versions: list[VersionOut]
    client_sha256: str
    client_size: int
    server_sha256: str
    server_size: int
    input_shape: list[int] | None
    input_dtype: str | None
    running_workers: int


class EventOut(Wire):
    id: str  # opaque (ev_…): pass it as ?after= to read the events after it
    at: str
    model: str
    kind: str
    message: str
    worker_id: str | None
    version: int | None
    token_id: str | None


class TokenIn(Wire):
    """A new token. Expiry: ``ttl_s`` (default 30 days), or ``expires_at``, or ``no_expiry``."""

    name: str = Field(pattern=NAME_PATTERN)
    model: str | None = Field(None, pattern=NAME_PATTERN)
    models: list[str] = Field(default_factory=list, max_length=100)
    ttl_s: float | None = Field(None, gt=0, le=MAX_TOKEN_TTL_S)
    expires_at: datetime | None = None
    no_expiry: bool = False
    quota: int | None = Field(None, ge=0)


class TokenUpdate(Wire):
    """Changes to a token; a field left out is unchanged. ``expires_at``/``quota`` set to
    ``null`` remove the expiry/the quota; ``enabled`` false disables it until enabled again."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    expires_at: datetime | None = None
    ttl_s: float | None = Field(None, gt=0, le=MAX_TOKEN_TTL_S)
    quota: int | None = Field(None, ge=0)
    enabled: bool | None = None


class AssignIn(Wire):
    model: str = Field(pattern=NAME_PATTERN)


class TokenOut(Wire):
    id: str
    name: str
    model: str | None  # its model when it has exactly one
    models: list[str]
    prefix: str
    masked: str  # cpt_abcd…: enough to tell tokens apart, never the value
    status: TokenStatus
    created_at: str
    updated_at: str | None
    expires_at: str | None
    revoked: bool
    quota: int | None
    queries_used: int
    last_used_at: str | None


class TokenCreated(TokenOut):
    token: str  # the clear value, shown once


class WorkerIn(Wire):
    """Start ``count`` workers of a model (all or none), on nodes of ``profile`` if given;
    ``standby``: load the model but do not consume its queue until resumed."""

    model: str = Field(pattern=NAME_PATTERN)
    count: int = Field(1, ge=1, le=64)
    profile: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    standby: bool = False


class WorkerLogLine(Wire):
    n: int
    at: float  # epoch seconds
    level: str
    source: str  # the process that wrote it: a node, the gateway, beat
    message: str


class NodeResources(Wire):
    """What a node host has (capacity) or has left for new workers (allocatable), as cluster
    schedulers report them. Memory is bytes; slots are parallel executions."""

    cores: int
    memory_bytes: int
    gpus: int
    slots: int


class SharedModelOut(Wire):
    """A model version a shared node holds loaded, and what its load added to the node's memory."""

    model: str
    version: int
    memory_bytes: int


class NodeOut(Wire):
    """A pool node as ``cipherpool pool nodes`` lists it. A provider sees the model and worker
    only of a binding of its own account; another account's shows as ``busy``."""

    name: str
    host: str
    profile: str
    host_class: str
    labels: dict[str, str]
    shared: bool
    status: str  # online, offline, or lost (online but silent for 3 heartbeats)
    threads: int | None
    capacity: NodeResources
    allocatable: NodeResources
    capabilities: list[str] = []  # the backends it can run (its probes passed when it registered)
    gpu_build: bool = False  # "gpu" among its capabilities (concrete's GPU build runs here), as 0.7 said it
    model: str | None = None
    worker_id: str | None = None
    worker_status: str | None = None
    busy: bool = False  # bound to a worker (of any account)
    shared_models: list[SharedModelOut] = []  # a shared node's loaded models (a provider's view: its own)
    heartbeat_age_s: float


class WorkerOut(Wire):
    id: str
    model: str | None
    node: str
    node_status: str | None
    status: WorkerStatus
    profile: str | None = None  # its node's profile
    standby: bool = False  # asked to stay loaded without consuming
    version: int | None = None  # the model version it loaded last
    error: str | None
    stop_reason: str | None = None  # who or what stopped it
    started_by: str = "user"  # user, schedule, autoscaler or reconciler
    schedule_id: str | None = None  # the schedule that started it, if one did
    created_at: str
    started_at: str | None
    stopped_at: str | None


class Figures(Wire):
    """Query counts and times over a span: one binding's, or a node's whole life."""

    since: float  # epoch seconds: when the span began (the model's load, or the node's start)
    queries_succeeded: int
    queries_refused: int  # typed refusals: bad input, wrong key, a query for another model
    queries_failed: int  # unexpected errors (the node's log has them)
    queries_requeued: int  # handed back to the model's queue after an unbind
    model_loads: int
    key_cache_hits: int
    key_cache_misses: int
    average_compute_s: float | None
    average_queue_wait_s: float | None
    last_compute_s: float | None


class KeyCacheOut(Wire):
    """The node's deserialized-key cache as it is now."""

    entries: int
    charged_bytes: int
    capacity_bytes: int
    evictions: int


class BlobCacheOut(Wire):
    """The node's disk cache of blobs (evaluation keys, server zips) since the node started;
    what is on disk (entries, bytes) survives a restart, the counts start at 0."""

    hits: int
    misses: int
    evictions: int
    corrupt: int  # files that did not match their sha256 (removed, fetched again)
    entries: int
    bytes: int
    capacity_bytes: int
    fetched_bytes: int  # read from the blob store on a miss
    served_bytes: int  # read from the node's disk on a hit


class TimingFigures(Wire):
    """Query times and rates over a span (a window of whole minutes, or all-time)."""

    queries: int  # computed
    refused: int  # the caller's errors, typed: a malformed or unevaluable ciphertext, a wrong key
    failed: int  # the platform's: unexpected errors, its own typed failures
    average_query_s: float | None  # queue wait + compute
    average_compute_s: float | None
    average_queue_wait_s: float | None
    queries_per_minute: float | None = None  # windows only
    error_rate: float | None  # failed / (computed + failed): the caller's refusals never count
    refusal_rate: float | None  # refused (the caller's errors) / all attempts
    # The nodes' deserialized-key cache for these queries: hits, misses (a key fetched and
    # deserialized), hits / both, and the average seconds a miss spent loading its key.
    key_cache_hits: int = 0
    key_cache_misses: int = 0
    key_cache_hit_ratio: float | None = None
    average_key_load_s: float | None = None
    # Key affinity (cipherpool.affinity): queries that reached their node through its
    # affinity queue, those that came through the model's queue instead (a fallback: the key
    # set's nodes busy past the bound, a query moved off a node that left), and the share of
    # fallbacks. Zero and None with affinity off and on shared nodes.
    affinity_routed: int = 0
    affinity_fallbacks: int = 0
    affinity_fallback_ratio: float | None = None


class CurrentFigures(Wire):
    """The latest queries: "current query time" is the average of the last ``queries`` of them."""

    queries: int
    average_query_s: float | None
    average_compute_s: float | None
    average_queue_wait_s: float | None
    latest_query_s: float | None
    latest_at: float | None  # epoch seconds


class WorkerTimings(Wire):
    """One worker's share of its model's figures (``shared``: queries run on shared nodes)."""

    worker_id: str
    node: str | None
    status: str | None  # None for ``shared``
    started_by: str | None = None
    window: TimingFigures
    all_time: TimingFigures
    current: CurrentFigures
    key_bytes: int | None = None  # deserialized keys resident in its node's key cache (the node's last report)


class ModelStats(Wire):
    """A model's query figures: over the window, all-time and its latest queries, what waits
    in its queue, its workers by status, and each worker's share."""

    model: str
    model_id: str
    status: str
    at: float  # epoch seconds when read
    window_s: int
    span_s: float  # what the window's whole minutes covered
    queue_depth: int | None  # queries waiting in its queue (None if the broker could not tell)
    workers_by_status: dict[str, int]
    window: TimingFigures
    all_time: TimingFigures
    current: CurrentFigures
    workers: list[WorkerTimings]
    # Requests the gateways refused for the model (its token's quota or rate, no worker up, an
    # invalid input, ...), by error code: over the window, and all-time (cipherpool.monitoring.refusals).
    refusals: dict[str, int] = {}
    refusals_all_time: dict[str, int] = {}


class WorkerStats(Figures):
    """A running worker's live figures. The counts at the top level cover this worker (its
    binding to the node) only; ``node_lifetime`` covers everything the node process served,
    other accounts' bindings included, so only the operator sees it
    (``GET /v1/platform/nodes/{node}/stats``, the metrics token): a provider's view
    (``GET /v1/workers/stats``, :meth:`provider_view`) has None there, and in every other
    field of :data:`NODE_WIDE` (figures of the node over its life, whoever it served)."""

    NODE_WIDE: ClassVar[tuple[str, ...]] = ("node_lifetime", "blob_cache")

    worker_id: str | None
    model_id: str | None
    model: str | None
    versions: list[int] = []  # the model versions loaded (two during a rollout)
    node: str
    host_class: str
    concurrency: int
    threads: int | None
    bound_for_s: float | None
    node_lifetime: Figures | None = None
    key_cache: KeyCacheOut  # this model's keys: the cache starts empty, its counters at 0, when the node binds another model
    blob_cache: BlobCacheOut | None = None  # the node's disk cache of blobs; None: off (CIPHERPOOL_NODE_BLOB_CACHE_BYTES)
    # From the model's recorded query times (cipherpool.monitoring), this worker's share:
    window_s: int | None = None
    window: TimingFigures | None = None
    current: CurrentFigures | None = None
    queue_depth: int | None = None  # the model's queue, shared by its workers

    def provider_view(self) -> WorkerStats:
        """What the worker's provider may see: the binding's own figures, none of the node's life."""
        return self.model_copy(update=dict.fromkeys(self.NODE_WIDE))


# ---- end user (access token) -----------------------------------------------------------


class ClientModelOut(Wire):
    """What a QueryClient needs: the model's identity, its serving version and the digest of
    that version's client specs (keys are made from them), and whether it is served."""

    id: str
    name: str
    status: ModelStatus
    version: int
    concrete_ml: str
    concrete_python: str
    client_zip_sha256: str
    running_workers: int
    input_shape: list[int] | None = None  # of the serving version, read from its client specs
    key_warmup: bool = False  # the gateway warms a new key set's workers (POST .../keys/{id}/warmup)


class KeyOut(Wire):
    key_id: str
    blob_id: str
    size_bytes: int


class KeySetOut(Wire):
    """One of the token's key sets (``GET /v1/client/keys``). ``made_for_version``: the newest
    version of the model with the client specs it was made from (None: no version has them
    any more); ``expires_at``: when it expires if unused until then (None: expired, or never)."""

    key_id: str
    model: str
    made_for_version: int | None
    serving_version: int
    status: KeySetStatus
    size_bytes: int
    blob_id: str
    created_at: str
    last_used_at: str | None
    expires_at: str | None
    expired_at: str | None = None


class WarmupOut(Wire):
    """A key set warmed: the dedicated nodes serving the model that ran one throwaway
    evaluation with it (its key deserialized and used, so the first real query is warm)."""

    nodes: int  # nodes asked
    warmed: int  # nodes that answered in time
    seconds: float  # the slowest warm-up


class QueryAccepted(Wire):
    """A query is queued (HTTP 202); wait on ``GET /v1/queries/{id}``."""

    id: str
    status: str  # queued | started


# -- credits --------------------------------------------------------------------------------
# Amounts are credits as decimal strings (exact to the micro-credit, never binary floats).


class CreditBalance(Wire):
    balance: Decimal
    unit: str = "credit"
    smallest_unit: str = "micro-credit"  # 0.000001 credit
    low_balance_threshold: Decimal
    low: bool  # below the threshold
    burn_rate_per_hour: Decimal  # workers' rates now plus the last hour's shared execution
    runs_out_in_s: float | None  # at that rate (None: nothing burns)
    runs_out_at: str | None
    workers_charged: int  # workers holding a node and charged now


class LedgerLine(Wire):
    id: str  # opaque (ln_…)
    at: str
    kind: LedgerKind
    amount: Decimal  # signed: charges are negative
    balance_after: Decimal
    model: str | None = None
    model_id: str | None = None
    worker_id: str | None = None
    node: str | None = None
    period_start: str | None = None
    period_end: str | None = None
    seconds: Decimal | None = None  # runtime or computation charged
    queries: int | None = None
    rate: Decimal | None = None  # credits per hour (runtime, standby) or per second (execution)
    reference: str | None = None
    note: str = ""


class PurchaseIn(Wire):
    amount: Decimal = Field(gt=0, max_digits=18, decimal_places=6)
    # A retried request with the same key credits nothing twice.
    idempotency_key: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    note: str = Field("", max_length=200)


class PurchaseOut(Wire):
    settled: bool  # credited now (False: the payment provider has not confirmed it yet)
    reference: str  # the payment provider's reference, else the invoice's number
    invoice: str  # the invoice's number (INV-...)
    status: str  # the invoice's: open (to be paid offline), paid, pending (not credited yet)
    note: str
    line: LedgerLine | None
    balance: Decimal


class UsageRow(Wire):
    day: str
    model: str | None
    model_id: str | None
    worker_id: str | None  # None: shared nodes
    kind: LedgerKind
    seconds: Decimal  # runtime (runtime, standby) or computation (execution)
    queries: int
    cost: Decimal


class UsageOut(Wire):
    since: str
    until: str
    rows: list[UsageRow]
    total_seconds: Decimal
    total_queries: int
    total_cost: Decimal
    balance: Decimal
    burn_rate_per_hour: Decimal
    runs_out_in_s: float | None
    runs_out_at: str | None


class ReportOut(Wire):
    period: str
    account_id: str
    since: str
    until: str
    opening_balance: Decimal
    credits_in: dict[str, Decimal]  # by kind: grant, purchase, refund, adjustment
    charges: dict[str, Decimal]  # by kind: runtime, standby, execution
    closing_balance: Decimal
    rows: list[UsageRow]
    total_seconds: Decimal
    total_queries: int
    total_cost: Decimal
    reconciles: bool  # opening + the period's lines == closing, and rows == charges


# ---- alerts (provider) -------------------------------------------------------------------

ALERT_MIN_WINDOW_S = 60  # an alert's window: at least a minute (the figures are kept per minute)
ALERT_MAX_WINDOW_S = 86_400  # ... at most a day (what monitoring.timings keeps)
WEBHOOK_URL_MAX = 2000


class AlertIn(Wire):
    """Set an alert: a new rule for the model's ``metric``, or its rule replaced. A field left
    out keeps the rule's value (a new rule: the platform's default window, no webhook);
    ``webhook_url: null`` removes the webhook. A new webhook URL gets a new secret, shown in
    the answer only; ``new_secret`` makes a new one for the same URL."""

    model: str = Field(pattern=NAME_PATTERN)
    metric: AlertMetric
    threshold: float = Field(ge=0, allow_inf_nan=False)  # fires when the figure is above it
    window_s: int | None = Field(None, ge=ALERT_MIN_WINDOW_S, le=ALERT_MAX_WINDOW_S)
    webhook_url: str | None = Field(None, min_length=1, max_length=WEBHOOK_URL_MAX)
    new_secret: bool = False


class AlertOut(Wire):
    id: str
    model: str
    model_id: str
    metric: AlertMetric
    threshold: float
    window_s: int
    webhook_url: str | None
    state: AlertState
    value: float | None  # the figure at the last evaluation (None: no query to measure)
    evaluated_at: str | None
    changed_at: str | None  # when it last fired or cleared
    created_at: str
    updated_at: str


class AlertSet(AlertOut):
    created: bool  # a new rule (False: the model's rule for this metric was replaced)
    webhook_secret: str | None = None  # a new webhook's signing secret: shown once, here only


class AlertEventOut(Wire):
    id: str  # opaque (al_…), the webhook call's event_id
    rule_id: str
    model: str
    metric: AlertMetric
    kind: AlertEventKind
    value: float | None
    threshold: float
    at: str
    delivery: WebhookDelivery
    attempts: int  # webhook calls made
    last_error: str | None
    delivered_at: str | None


class AlertWebhookBody(Wire):
    """What an alert's webhook receives (JSON, signed: see :mod:`cipherpool.alerts.signature`).
    A call may be repeated (a retry after a lost answer): ``event_id`` tells them apart."""

    event_id: str  # opaque (al_…): the same in every retry of one call
    rule_id: str
    model: str
    model_id: str
    metric: AlertMetric
    kind: AlertEventKind
    value: float | None
    threshold: float
    window_s: int
    at: str  # ISO 8601, UTC: when it fired or cleared


# -- worker schedules -----------------------------------------------------------------------
# Times are ISO 8601 in UTC; a cron expression is read on the wall clock of its time zone.

PROFILE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_SCHEDULE_WORKERS = 64  # as one start may ask for


class ScheduleIn(Wire):
    """A worker schedule of ``model``: recurring windows (``start_cron`` to ``stop_cron``,
    five-field cron expressions read in ``timezone``), or one reservation (``starts_at`` to
    ``ends_at``; a time without an offset is UTC). While a window is open the schedule keeps
    ``workers`` of its own running, on nodes of ``profile`` if given."""

    model: str = Field(pattern=NAME_PATTERN)
    name: str | None = Field(None, pattern=NAME_PATTERN)
    start_cron: str | None = Field(None, min_length=1, max_length=100)
    stop_cron: str | None = Field(None, min_length=1, max_length=100)
    timezone: str = Field("UTC", min_length=1, max_length=64)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    workers: int = Field(1, ge=1, le=MAX_SCHEDULE_WORKERS)
    profile: str | None = Field(None, pattern=PROFILE_PATTERN)


class ScheduleActionOut(Wire):
    """A start or stop the schedule applied to one of its windows (or a stop on its pause)."""

    window_start: str
    action: str  # start | stop
    status: ScheduleActionStatus
    attempts: int
    at: str
    message: str


class ScheduleOut(Wire):
    id: str
    name: str
    model: str
    kind: ScheduleKind
    start_cron: str | None
    stop_cron: str | None
    timezone: str
    starts_at: str | None
    ends_at: str | None
    workers: int
    profile: str | None
    paused: bool
    created_at: str
    updated_at: str
    window_start: str | None  # the window open now (paused or not), else None
    window_end: str | None
    next_start: str | None  # None while paused, or when no window is to come
    next_stop: str | None
    running_workers: int  # its own workers starting, up or on standby
    last_actions: list[ScheduleActionOut]  # the latest first


# -- autoscaling (provider) ----------------------------------------------------------------
# Durations are seconds. A field left out of a PUT keeps its value (a new policy: the
# default); ``null`` clears a target (at least one must remain).

MAX_AUTOSCALE_S = 86400.0  # the longest target, delay or cool-down: a day


class AutoscaleIn(Wire):
    """Turn a model's autoscaling on, or change it: add a worker when the average queue wait
    (``target_queue_wait_s``) or the queries waiting per worker (``target_queue_depth``) stay
    above their target for ``scale_up_after_s``; remove one after ``idle_after_s`` with no
    query and an empty queue; wait ``cooldown_up_s``/``cooldown_down_s`` after any change."""

    target_queue_wait_s: float | None = Field(None, gt=0, le=MAX_AUTOSCALE_S)
    target_queue_depth: int | None = Field(None, ge=1, le=1_000_000)
    scale_up_after_s: float | None = Field(None, ge=0, le=MAX_AUTOSCALE_S)
    idle_after_s: float | None = Field(None, gt=0, le=MAX_AUTOSCALE_S)
    cooldown_up_s: float | None = Field(None, gt=0, le=MAX_AUTOSCALE_S)
    cooldown_down_s: float | None = Field(None, gt=0, le=MAX_AUTOSCALE_S)


class AutoscaleOut(Wire):
    """A model's autoscaling policy (``enabled`` false: off, with the settings it would use),
    its bounds and workers now, and what the autoscaler is seeing and did last."""

    model: str
    enabled: bool
    target_queue_wait_s: float | None
    target_queue_depth: int | None
    scale_up_after_s: float
    idle_after_s: float
    cooldown_up_s: float
    cooldown_down_s: float
    min_workers: int
    max_workers: int
    workers: int  # starting or running now
    above_since: str | None  # a target has been exceeded since then (ISO 8601, UTC)
    idle_since: str | None  # nothing queued and no query computed since then
    last_scaled_at: str | None
    last_action: str | None  # up, down, or blocked (an add was refused; see last_reason)
    last_reason: str | None
    updated_at: str | None  # when the policy was last set or turned off


# The platform's own health (operator only: `cipherpool status`, GET /v1/platform/status with
# the metrics token; see cipherpool.monitoring.components). States: cipherpool.monitoring.liveness.
class ProcessHealth(Wire):
    """A platform process that heartbeats into Redis: a gateway, a control worker or beat."""

    role: str  # gateway, control, beat
    instance: str  # its name: host:pid for a gateway and beat, the Celery node name of a control worker
    host: str
    pid: int
    version: str
    started_at: datetime
    last_seen: datetime
    age_s: float  # since its last heartbeat
    interval_s: float  # how often it heartbeats
    state: ComponentState


class BeatJobHealth(Wire):
    """One of beat's jobs: when a control worker last finished it, against its interval."""

    job: str  # the beat schedule's entry: reconcile, billing, schedules, alerts, autoscale
    task: str
    interval_s: float
    last_run: datetime | None  # None: never (since Redis was new)
    age_s: float | None  # since its last run; never run: since beat started (None: no beat either)
    state: ComponentState


class NodeHealth(Wire):
    name: str
    host: str
    host_class: str
    shared: bool
    status: str  # online, lost (online but silent for 3 heartbeats), offline (stopped)
    heartbeat_age_s: float
    bound_models: int  # a dedicated node: its worker's model (0 or 1); a shared node: the models it holds loaded
    state: ComponentState


class StoreHealth(Wire):
    """Redis (the blob store, where heartbeats and platform events live too)."""

    reachable: bool
    used_memory_bytes: int | None
    maxmemory_bytes: int | None  # 0: no bound
    memory_ratio: float | None  # used / max; None without a bound
    error: str | None
    state: ComponentState


class ComponentHealth(Wire):
    component: Component
    state: ComponentState
    detail: str


class PlatformEventOut(Wire):
    """A component's state changed, as the watchdog of the gateway holding the lease recorded it."""

    id: int
    at: datetime
    component: Component
    previous: ComponentState | None  # None: the first state ever recorded
    state: ComponentState
    detail: str


class PlatformStatus(Wire):
    """Every component of the platform with its state; ``state`` is the worst of them."""

    at: datetime
    state: ComponentState
    components: list[ComponentHealth]
    gateways: list[ProcessHealth]
    control_workers: list[ProcessHealth]
    beats: list[ProcessHealth]
    beat_jobs: list[BeatJobHealth]
    nodes: list[NodeHealth]
    store: StoreHealth
    events: list[PlatformEventOut]  # the latest, newest first
