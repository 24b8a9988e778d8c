"""One typed settings object, read from ``CIPHERPOOL_*`` environment variables.

Every process of the platform (control worker, pool node, beat, CLI) and every client builds
its configuration from here, so a deployment is described by its environment alone. Units are
in the field names (``_s`` seconds, ``_bytes`` bytes).
"""

from __future__ import annotations

import ipaddress
import json
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cipherpool import backends

GIB = 1024**3
MIB = 1024**2
KIB = 1024
PROFILES_FILE = "profiles.toml"  # node profiles, in the data directory unless CIPHERPOOL_PROFILES_FILE
STACK_FILE = "stack.json"  # written by `cipherpool up` in the data directory (0600): the gateway URL
MAX_AUTH_CACHE_TTL_S = 5.0  # a revoked token or API key stops working within this long
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "unix"})  # broker URLs of the Redis transport


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CIPHERPOOL_", extra="ignore")

    # Where things are. A broker URL of None means "embedded": `cipherpool up` starts Redis.
    broker_url: str | None = None
    result_backend: str | None = Field(None, description="defaults to broker_url")
    # The platform's Redis beside the broker: counters, rate limits, query owners, heartbeats
    # (and the blobs, with blob_store "redis"). With a Redis broker it is the broker's.
    store_url: str | None = Field(None, description="the platform's Redis; defaults to broker_url")
    database_url: str | None = Field(None, description="defaults to SQLite under data_dir")
    data_dir: Path = Path.home() / ".cipherpool"

    # The blob store (cipherpool.blobs): model zips, evaluation keys, large query payloads.
    # "fs": files under blob_dir (a shared mount in a cluster); "s3": an S3-compatible bucket;
    # "redis": the platform's Redis (small setups). None: "fs" for `cipherpool up` and wherever no
    # broker URL is set, "redis" where one is (what a platform configured by URL stored before).
    blob_store: Literal["fs", "s3", "redis"] | None = None
    blob_dir: Path | None = Field(None, description="fs: None -> <data_dir>/blobs")
    # fs and s3: refuse writes (507 store_full) that would take the store past this many bytes
    # (0: no cap; a full disk, a quota or a bucket quota refuse the same way on their own).
    blob_store_max_bytes: int = Field(0, ge=0)
    # How often a process that writes temporaries (uploads, staged artifacts, payloads) removes
    # those past their deadline (fs and s3; Redis expires keys itself).
    blob_sweep_interval_s: float = Field(300.0, gt=0)
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = Field(None, description="None: AWS; e.g. http://minio:9000")
    s3_region: str | None = None
    # Credentials; None: boto3's own chain (AWS_ACCESS_KEY_ID..., a profile, an instance role).
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_prefix: str = ""  # object keys start with this (e.g. "cipherpool/"), to share a bucket
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"  # path: MinIO, Ceph RGW, SeaweedFS
    # A pool node's disk cache of blobs (evaluation keys, server zips) under
    # <data_dir>/blob-cache/<node>; None: 8 GiB, or 0 (off) with blob_store "fs", already a disk.
    node_blob_cache_bytes: int | None = Field(None, ge=0)

    # What a client talks to: the gateway. None: the URL that `cipherpool up` wrote into the
    # data directory (STACK_FILE), as `ray start` then `ray.init()` finds a local cluster.
    url: str | None = None
    # Credentials a client may take from its environment instead of its code.
    api_key: str | None = None
    token: str | None = None

    # The gateway (HTTP front door). Loopback unless the operator exposes it.
    gateway_host: str = "127.0.0.1"
    gateway_port: int | None = Field(None, description="None: a free port")
    # Bearer credentials are looked up once and cached this long (<= 5 s: revocation and
    # deactivation take effect within it); saves a database round trip per query.
    auth_cache_ttl_s: float = 2.0
    # A credential's cached lookups are loaded again in the background (each within the TTL
    # above) for this long after its last request, so that a client slower than the TTL (a
    # model that computes for longer) still finds them cached; 0: only while read within it.
    auth_cache_warm_s: float = Field(30.0, ge=0, le=3600)
    # Longest single wait of a long-polling request; a client polls again until its own
    # query timeout, so no HTTP request outlives a proxy's idle timeout.
    long_poll_s: float = 25.0
    # FastAPI's own OpenTelemetry spans and metrics, for an operator who runs the gateway under
    # an OpenTelemetry SDK (opentelemetry-instrument). Off: its per-request check of the global
    # providers was 3 % of the query route's CPU, and the platform's figures are its own
    # (/metrics, docs/monitoring.md).
    gateway_telemetry: bool = False
    # Readiness (GET /v1/ready, for load balancers): each dependency check gives up after
    # ready_timeout_s; a schema found at head is trusted for ready_schema_cache_s before the
    # database's migration table is read again (a probe every second must stay cheap).
    ready_timeout_s: float = Field(2.0, gt=0)
    ready_schema_cache_s: float = Field(30.0, ge=0)

    # Limits checked before any work, after authentication (bytes; 0 rate = unlimited).
    max_json_bytes: int = 64 * KIB
    max_ciphertext_bytes: int = 16 * MIB
    # Batches (POST /v1/queries/batch): the body cap of one, and how many ciphertexts it may
    # hold; a QueryClient sends a 2-D predict in batches of at most batch_size rows.
    max_batch_bytes: int = 64 * MIB
    batch_max_items: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    # ... and no more rows than the node's compute per row (measured on a first small batch)
    # fits in this many seconds: a batch is one task, to end well within visibility_timeout_s.
    batch_target_s: float = Field(20.0, gt=0)
    max_evaluation_key_bytes: int = 512 * MIB
    max_deployment_zip_bytes: int = 256 * MIB
    max_deployment_unzipped_bytes: int = 1 * GIB  # the sum of a zip's declared member sizes
    max_keys_per_token: int = 16
    # Stored evaluation-key bytes (the sizes of live key sets, each counted in full even where
    # two share a content-addressed blob): per token and per account (all its tokens); 0: no
    # quota. A key set that would pass one is refused (409 token_key_quota_exceeded or
    # account_key_quota_exceeded); one above max_evaluation_key_bytes is 413 payload_too_large.
    max_key_bytes_per_token: int = Field(1 * GIB, ge=0)
    max_key_bytes_per_account: int = Field(32 * GIB, ge=0)
    # Key sets unused this long (no query, no warm-up with them) expire: the row is kept as
    # expired (a query with it gets 410 evaluation_key_expired, naming the model version) and
    # its blob is removed; key sets of expired or revoked tokens expire at once. 0: never.
    key_idle_expiry_s: float = Field(30 * 86400.0, ge=0)
    # A blob no row references any more (a replaced, deleted or expired key set's; a deleted
    # model's) is removed by beat's key sweep once it has been unreferenced this long: above
    # query_timeout_s + auth_cache_ttl_s, so that a query queued with it still finds it, and
    # above the longest database transaction, so that an upload adopting it meanwhile keeps it.
    blob_sweep_grace_s: float = Field(900.0, ge=0)
    key_sweep_interval_s: float = Field(60.0, gt=0)  # beat's key sweep: last uses, idle expiry, blob removal
    upload_ttl_s: int = 3600  # a staged upload not deployed within this long is dropped
    token_rate_per_s: float = 100.0  # requests per second per access token
    account_rate_per_s: float = 500.0  # requests per second per account (its tokens included)
    # Failed authentications (a missing, malformed, unknown, revoked or expired credential; a
    # wrong metrics token) per source address: after auth_failure_burst of them within one
    # window of auth_failure_window_s, the source's requests that need a credential lookup are
    # refused (429 rate_limited, Retry-After: the window's end) before any lookup. 0: no limit.
    auth_failure_burst: int = Field(20, ge=0)
    auth_failure_window_s: int = Field(60, ge=1)
    # Proxies (addresses or CIDRs, comma-separated) whose X-Forwarded-For is believed: behind
    # them a request's source is the nearest address in that header that is not theirs.
    # Empty: the peer's own address, whatever the header says.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The embedded Redis: memory bound; the policy is noeviction, so queued work and keys are
    # never silently dropped (writes are refused with StoreFull instead).
    redis_maxmemory_bytes: int = 4 * GIB

    # Pool node profile (docs/architecture.md, 'Threads per execution': threads = cores / parallel executions). A node started
    # with a profile (``node_profile``, read from ``profiles_file``) takes its class, threads,
    # concurrency, key cache, labels and sharing from it; without one, from the fields below.
    node_profile: str | None = None
    profiles_file: Path | None = Field(None, description="None: <data_dir>/profiles.toml")
    host_class: str = backends.DEFAULT_HOST_CLASS  # one of backends.host_classes()
    # Extra hooks of a pool node (``module:Class``, comma-separated), besides its statistics:
    # see cipherpool.workers.hooks.
    node_hooks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    node_threads: int | None = Field(None, description="OMP_NUM_THREADS for FHE runs")
    # KMP_BLOCKTIME of FHE runs: how long OpenMP's idle threads spin after a run before they
    # sleep. libomp's own 200 ms kept a core busy after every answer (cipherpool/fhe/threads.py).
    node_spin_ms: int = Field(0, ge=0, description="KMP_BLOCKTIME (ms) for FHE runs")
    # Import concrete when a node starts, not when it first binds a model (cold start).
    node_preload: bool = True

    # When a client uploads a key set (and a throwaway ciphertext), each node serving the model
    # runs one evaluation with it, so the client's first query finds the key deserialized and
    # used (first query 2.7 s -> about a warm one's 1.2 s on digits). It costs each node one
    # evaluation per new key set.
    key_warmup: bool = True
    key_warmup_timeout_s: float = 30.0

    # Evaluation-key cache, per node process. A used key costs several times its serialized
    # size in memory (35 MB key -> ~185-650 MB), so the bound is in bytes of *estimated*
    # resident size = serialized size x key_memory_factor.
    key_cache_bytes: int = 4 * GIB
    key_memory_factor: float = 6.0

    # Key affinity (cipherpool.affinity): a key set's queries go to the node of the model that
    # holds its deserialized key (rendezvous hashing over the model's up nodes, a queue per
    # node), so with more key sets than one node's cache holds most queries still hit. A node
    # with affinity_bound queries per execution slot outstanding from this gateway is passed
    # over for the next node in rank, then for any of the model's workers; a query whose answer
    # the gateway never hears counts for affinity_hold_s. A key set may use as many nodes in rank
    # (and is warmed on them) as the nodes' caches have room for among the model's key sets
    # active in the last minute, each node counted as holding affinity_keys_per_node; at least
    # affinity_homes.
    key_affinity: bool = True
    affinity_bound: int = Field(2, ge=1)
    affinity_homes: int = Field(1, ge=1)
    affinity_keys_per_node: float = Field(1.0, gt=0)
    affinity_hold_s: float = Field(30.0, gt=0)

    # Payloads above this size travel by reference through the blob store, not in messages.
    inline_max_bytes: int = 512 * KIB
    payload_ttl_s: int = 3600

    # Time limits.
    query_timeout_s: float = 300.0
    management_timeout_s: float = 30.0
    worker_start_timeout_s: float = 300.0
    # Redis redelivers a task not acknowledged this long after a node took it (a killed node's
    # query). Above the longest single FHE run (seconds here; raise it for big models), and
    # below query_timeout_s so that the redelivered query still has a client waiting.
    visibility_timeout_s: int = 120
    result_expires_s: int = 3600
    # With Redis as the broker, a query can vanish between Redis and a node (a partition while
    # the node waits for work: cipherpool.inflight). Beat sends again, under the same id, a
    # query found twice this far apart in no queue, in no node's hands and not started, at most
    # redelivery_max times. 0 turns it off (RabbitMQ never needs it: it is off there anyway).
    redelivery_grace_s: float = Field(10.0, ge=0)
    redelivery_max: int = Field(3, ge=0)
    node_heartbeat_s: float = 10.0
    # A worker's task events (what Flower's Tasks page shows) are sent this long after the
    # first of them, together, off the task's start; 0: at the worker's next loop turn, one
    # message per turn (Celery's own).
    event_flush_s: float = Field(0.05, ge=0, le=5)
    # Beat's reconciler: how often it looks for workers whose node went silent (a node is lost
    # after 3 missed heartbeats), fails them with the reason and starts replacements.
    reconcile_interval_s: float = 5.0
    # After a rollout, how long nodes keep the previous version for queries queued before
    # the switch. None: query_timeout_s + auth_cache_ttl_s (a query older than that expired).
    version_grace_s: float | None = None

    # Clients: how long an idempotent call (a GET, a status poll, a DELETE) keeps retrying while
    # the gateway is unreachable or a proxy says it is (a restart), when the call has no
    # timeout of its own; a long poll retries within its own timeout instead.
    gateway_retry_s: float = Field(30.0, ge=0)
    # Clients: a query's own calls (its submit, its polls) over the standard library's HTTP on
    # kept connections, not httpx (about 1 ms of a client's CPU less per query:
    # cipherpool/client/lean.py); off sends them through httpx as every other call.
    client_lean_http: bool = True

    # Credits (cipherpool.billing). Amounts are credits, exact to the micro-credit (six
    # decimals); rates are per host class, and a node profile may set its own (profiles.toml:
    # rate, standby_rate, execution_rate). A rate change applies from when beat (or the node
    # registering) sees it, never to time already past.
    billing_interval_s: float = 60.0  # how often beat charges running workers
    # Defaults: each host class's backend says (cipherpool.backends, Rates).
    rate_per_hour: dict[str, Decimal] = Field(default_factory=lambda: backends.default_rates("per_hour"))
    standby_rate_per_hour: dict[str, Decimal] = Field(default_factory=lambda: backends.default_rates("standby_per_hour"))
    # Shared nodes: per second of computation (queue time is free).
    execution_rate_per_s: dict[str, Decimal] = Field(default_factory=lambda: backends.default_rates("execution_per_s"))
    credits_signup_grant: Decimal = Decimal("100")  # granted to a new account (0: none)
    credits_low_balance: Decimal = Decimal("10")  # below this, a credits_low event on the models with workers
    credits_min_start_minutes: float = 10.0  # a start needs this long at the workers' rate in the balance
    credits_max_purchase: Decimal = Decimal("1000000")  # one purchase at most
    # ``module:Class`` of the payment provider purchases go through; the default records an
    # invoice to be paid offline and credits the account at once.
    payment_provider: str = "cipherpool.billing.payments:OfflineInvoice"

    # Monitoring beside the pool.
    flower_port: int | None = None
    # Query times: nodes record each query's queue wait and compute in Redis, per model, worker
    # and minute (cipherpool.monitoring); windows are read from those minutes.
    stats_window_s: int = 300  # the default window of averages (`worker stats`, alerts)
    stats_recent: int = 20  # "current" query time: the average of this many latest queries
    # The gateway's Prometheus endpoint (/metrics) answers a bearer of this token only; unset,
    # it is off (it shows every account's figures, so it is for the operator's scraper).
    metrics_token: str | None = None
    # The platform's own health (`cipherpool status`, GET /v1/platform/status, /metrics): gateways,
    # control workers and beat heartbeat into Redis this often, and every gateway's watchdog
    # judges each component this often, recording one platform event per change of state.
    platform_heartbeat_s: float = Field(10.0, gt=0)
    platform_watchdog_s: float = Field(10.0, gt=0)

    # Beat's other jobs (cipherpool.scheduler): how often each looks.
    schedule_interval_s: float = 15.0  # worker schedules: starts and stops at most this late
    alert_interval_s: float = 15.0  # alert rules are evaluated this often
    autoscale_interval_s: float = 10.0  # autoscaling decisions
    # Alert webhooks: each call is signed (HMAC-SHA256 of the body with the rule's secret),
    # retried with exponential backoff from webhook_backoff_s, at most webhook_attempts times.
    webhook_timeout_s: float = 5.0
    webhook_attempts: int = 6
    webhook_backoff_s: float = 2.0
    # Webhooks to loopback, private or link-local addresses are refused unless this is set:
    # the control worker runs inside the cluster, next to Redis and the database.
    webhook_allow_private: bool = False

    @field_validator("node_hooks", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        """Each an address or a CIDR, refused when the settings load rather than at a request."""
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an address or a CIDR") from None
        return value

    @field_validator(
        "rate_per_hour",
        "standby_rate_per_hour",
        "execution_rate_per_s",
        "credits_signup_grant",
        "credits_low_balance",
        "credits_max_purchase",
    )
    @classmethod
    def _credits(cls, value: object) -> object:
        """Credits are exact to the micro-credit and never negative: a rate that is not would
        make every charge fail, so it is refused when the settings load."""
        for amount in value.values() if isinstance(value, dict) else [value]:
            if not isinstance(amount, Decimal) or amount < 0 or amount != round(amount, 6):
                raise ValueError(f"{amount!r}: credits are >= 0 with at most six decimals")
        return value

    @field_validator("auth_cache_ttl_s")
    @classmethod
    def _auth_cache_bound(cls, value: float) -> float:
        if not 0 <= value <= MAX_AUTH_CACHE_TTL_S:
            raise ValueError(f"auth_cache_ttl_s must be between 0 and {MAX_AUTH_CACHE_TTL_S:g} s")
        return value

    def effective_version_grace_s(self) -> float:
        if self.version_grace_s is not None:
            return self.version_grace_s
        return self.query_timeout_s + self.auth_cache_ttl_s

    def effective_profiles_file(self) -> Path:
        return Path(self.profiles_file or Path(self.data_dir).expanduser() / PROFILES_FILE)

    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'cipherpool.db'}"

    def effective_broker_url(self) -> str:
        if not self.broker_url:
            from cipherpool.errors import ConfigurationError

            raise ConfigurationError(
                "No broker configured: set CIPHERPOOL_BROKER_URL (e.g. redis://127.0.0.1:6379/0) "
                "or run `cipherpool up`, which starts an embedded Redis and prints the URL."
            )
        return self.broker_url

    def broker_is_redis(self) -> bool:
        """Redis (``redis://``, ``rediss://``, ``redis+socket://``), not an AMQP broker."""
        return bool(self.broker_url) and self.effective_broker_url().split("://", 1)[0] in REDIS_SCHEMES

    def effective_result_backend(self) -> str:
        return self.result_backend or self.effective_broker_url()

    def effective_store_url(self) -> str:
        return self.store_url or self.effective_broker_url()

    def effective_blob_store(self) -> str:
        if self.blob_store:
            return self.blob_store
        return "redis" if self.broker_url or self.store_url else "fs"

    def effective_blob_dir(self) -> Path:
        return Path(self.blob_dir or Path(self.data_dir) / "blobs").expanduser()

    def effective_node_blob_cache_bytes(self) -> int:
        if self.node_blob_cache_bytes is not None:
            return self.node_blob_cache_bytes
        return 0 if self.effective_blob_store() == "fs" else 8 * GIB

    def stack_file(self) -> Path:
        return Path(self.data_dir).expanduser() / STACK_FILE

    def effective_url(self) -> str:
        """The gateway a client talks to: explicit, else CIPHERPOOL_URL, else the local stack's."""
        if self.url:
            return self.url.rstrip("/")
        from cipherpool.errors import ConfigurationError

        path = self.stack_file()
        try:
            url = json.loads(path.read_text())["url"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigurationError(
                f"No gateway URL: pass url=, set CIPHERPOOL_URL, or run `cipherpool up` on this machine (it writes {path})."
            ) from None
        return str(url).rstrip("/")


# Query parameters that hold a secret (``?password=``, ``?sslpassword=``, ``?access_token=``):
# the last word of the name (split at anything but letters and digits) ends with one of these.
# Masking a harmless one too (``?sslkey=``, a path) costs a log line nothing.
SECRET_PARAMETERS = frozenset({"password", "passwd", "pass", "pwd", "secret", "token", "key"})


def mask_url(url: str) -> str:
    """A URL fit to print or log: its password, and the value of each query parameter named
    like a secret (:data:`SECRET_PARAMETERS`), replaced by ***. Kombu's failover form, URLs
    joined by ``;``, is masked part by part."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        masked = parts
        if parts.password is not None:
            user = parts.username or ""
            host = parts.netloc.rpartition("@")[2]  # as written: an IPv6 address keeps its brackets
            masked = masked._replace(netloc=f"{user}:***@{host}")
        if parts.query:
            masked = masked._replace(query="&".join(_mask_parameter(p) for p in parts.query.split("&")))
        return url if masked == parts else urlunsplit(masked)
    except ValueError:
        return "<unprintable URL>"


def _mask_parameter(parameter: str) -> str:
    import re
    from urllib.parse import unquote_plus

    name, equals, _value = parameter.partition("=")
    words = re.split(r"[^a-z0-9]+", unquote_plus(name).lower())
    return f"{name}=***" if equals and words[-1].endswith(tuple(SECRET_PARAMETERS)) else parameter


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CIPHERPOOL_* variables, so child processes see exactly these."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            value = ",".join(map(str, value)) or None
        elif isinstance(value, dict):  # read back as JSON (pydantic-settings' rule for complex fields)
            value = json.dumps({str(k): str(v) for k, v in value.items()})
        if value is not None:
            env[f"CIPHERPOOL_{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and `cipherpool up` change the environment)."""
    get_settings.cache_clear()
