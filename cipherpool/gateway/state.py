"""What one gateway process holds: settings, database and store access, the Celery app it
publishes with, the authenticator, the rate limiter and the failed-authentication throttle,
the result waiter and its readiness, its HTTP request metrics, its count of refusals and its
key-affinity router.

Nothing here connects to anything when it is built or started: the gateway starts while the
database, the broker or Redis is down, answers /v1/ready 503 until they are back, and then
serves without a restart (see :mod:`cipherpool.gateway.readiness`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery

from cipherpool.affinity import Router
from cipherpool.config.celery import create_app as create_celery
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.gateway.affinity import router_for
from cipherpool.gateway.auth import Authenticator
from cipherpool.gateway.httpmetrics import RequestMetrics
from cipherpool.gateway.ratelimit import RateLimiter
from cipherpool.gateway.readiness import Readiness
from cipherpool.gateway.refusals import RefusalRecorder
from cipherpool.gateway.results import ResultWaiter
from cipherpool.gateway.throttle import AuthThrottle
from cipherpool.store import BlobStore

UPLOADS = "/v1/uploads"
KEYS = "/v1/client/keys/"
QUERIES = "/v1/queries"
QUERY_BATCHES = QUERIES + "/batch"


@dataclass
class GatewayState:
    settings: Settings
    ctx: PlatformContext = field(init=False)
    celery: Celery = field(init=False)
    auth: Authenticator = field(init=False)
    limiter: RateLimiter = field(init=False)
    throttle: AuthThrottle = field(init=False)
    waiter: ResultWaiter = field(init=False)
    readiness: Readiness = field(init=False)
    requests: RequestMetrics = field(init=False)  # this process's HTTP requests (GET /metrics)
    refusals: RefusalRecorder = field(init=False)  # refusals counted here, written to Redis every second
    router: Router | None = field(init=False)  # key affinity: which node's queue a query goes to (None: off)
    publishing_on_loop: int = field(default=0, init=False)  # queries being published from the event loop now

    def __post_init__(self) -> None:
        s = self.settings
        self.ctx = PlatformContext(s)
        self.celery = create_celery(s, name="cipherpool-gateway")
        # Publish only. With a Redis result backend, Celery's send_task subscribes its own
        # result consumer to every task's channel (on_task_call), which the gateway would never
        # read: measured 9.6 core-ms per query in the gateway with it. The gateway waits with
        # its ResultWaiter; nodes still store results (that is the worker's configuration).
        self.celery.conf.result_backend = None
        self.auth = Authenticator(self.ctx)
        self.limiter = RateLimiter(self.ctx.store.redis, s.token_rate_per_s, s.account_rate_per_s)
        self.throttle = AuthThrottle(self.ctx.store.redis, s.auth_failure_burst, s.auth_failure_window_s, s.trusted_proxies)
        self.waiter = ResultWaiter(s.effective_result_backend())
        self.readiness = Readiness(s, self.celery, self.ctx.store, self.waiter)
        self.requests = RequestMetrics()
        self.refusals = RefusalRecorder(self.ctx)
        self.router = router_for(s)

    @property
    def store(self) -> BlobStore:
        return self.ctx.store

    def body_cap(self, method: str, path: str) -> int:
        """The largest body a route accepts, known before the body is read."""
        s = self.settings
        if method == "PUT" and path == UPLOADS:
            return s.max_deployment_zip_bytes
        if method == "POST" and path.startswith(KEYS) and path.endswith("/warmup"):
            return s.max_ciphertext_bytes
        if method == "PUT" and path.startswith(KEYS):
            return s.max_evaluation_key_bytes
        if method == "POST" and path == QUERIES:
            return s.max_ciphertext_bytes
        if method == "POST" and path == QUERY_BATCHES:
            return s.max_batch_bytes
        return s.max_json_bytes

    async def start(self) -> None:
        await self.waiter.start()
        self.refusals.start()

    async def close(self) -> None:
        await self.refusals.stop()  # what is counted still goes out
        await self.waiter.close()
        self.auth.close()
        self.celery.close()
