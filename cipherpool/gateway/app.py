"""The gateway application: ``uvicorn --factory cipherpool.gateway.app:create_app``.

Every answer that is not a success is ``{"code", "message"}`` with the HTTP status of the
error's class (:mod:`cipherpool.errors`), including FastAPI's own validation errors and
unknown routes, so a client always gets a typed error and never a bare 500 page. A
dependency's outage is a 503 with Retry-After (``database_unavailable``,
``broker_unavailable``); the generic 502 is for the gateway's own faults only.

``/v1/health`` is liveness: 200 while the process runs, whatever is down. ``/v1/ready`` is
readiness, for load balancers: 200 only while every part the gateway needs answers
(:mod:`cipherpool.gateway.readiness`).

Every request is timed and counted by route template (:mod:`cipherpool.gateway.httpmetrics`,
outermost), and every refusal counted by code (:mod:`cipherpool.gateway.refusals`): here for
what the routes raise, in the guard for what it answers itself. ``/docs`` and ``/redoc`` load
nothing from outside the gateway (:mod:`cipherpool.gateway.apidocs`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cipherpool.api.schemas import Health, NotReadyBody, ReadyBody
from cipherpool.config.settings import Settings, get_settings
from cipherpool.errors import CipherpoolError, InvalidInput, NotFound, NotReady, PayloadTooLarge, RemoteError, StoreFull
from cipherpool.gateway import (
    account,
    alerts,
    apidocs,
    autoscale,
    credits,
    enduser,
    metrics,
    models,
    platform_status,
    queries,
    querylane,
    schedules,
    stats,
    tokens,
    workers,
)
from cipherpool.gateway.guard import Guard, error_body
from cipherpool.gateway.httpmetrics import RequestMetricsMiddleware
from cipherpool.gateway.platform_watch import PlatformWatch
from cipherpool.gateway.state import GatewayState
from cipherpool.outages import OUTAGE_TYPES, logged_outage

log = logging.getLogger("cipherpool.gateway")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    from cipherpool.version import __version__

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.gw.start()
        watch = PlatformWatch(app.state.gw.ctx).start()  # its heartbeat and the platform's watchdog
        try:
            yield
        finally:
            await watch.stop()
            await app.state.gw.close()

    app = FastAPI(
        title="cipherpool",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # apidocs: the same pages, with their scripts served here rather than from a CDN
        redoc_url=None,
        telemetry=_telemetry(settings.gateway_telemetry),
        description="Encrypted (FHE) machine-learning queries. Authenticate with `Authorization: Bearer` and an "
        "account API key (cpk_…, provider endpoints) or an access token (cpt_…, end-user endpoints).",
    )
    app.state.gw = GatewayState(settings)
    app.add_middleware(Guard)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.gw.requests)  # added last: outermost
    _install_error_handlers(app)
    apidocs.install(app)
    routers = [
        queries.router,  # first: the routes matched on every query; FastAPI tries routers in order
        account.router,
        credits.router,
        stats.router,
        models.router,
        tokens.router,
        workers.router,
        enduser.router,
        alerts.router,
        schedules.router,
    ]
    routers.append(autoscale.router)  # /v1/models/{name}/autoscale
    routers.append(metrics.router)  # GET /metrics, for the operator's Prometheus (its own token)
    routers.append(platform_status.router)  # GET /v1/platform/status, the operator's too (the metrics token)
    for router in routers:
        app.include_router(router)

    @app.get("/v1/health", response_model=Health, tags=["platform"])
    async def health() -> Health:
        """Liveness: 200 while the process runs, whatever is down (a restart would not bring
        a database back); needs no credentials. Whether it can serve: ``/v1/ready``."""
        return Health(status="ok", version=__version__)

    @app.get(
        "/v1/ready",
        response_model=ReadyBody,
        tags=["platform"],
        responses={503: {"model": NotReadyBody, "description": "a part the gateway needs does not answer"}},
    )
    async def ready() -> JSONResponse:
        """Readiness, for load balancers: the database (and its schema at this gateway's
        head), the broker, the store and the result backend, each checked with a short
        timeout; 503 ``not_ready`` naming each failing part. Needs no credentials."""
        checks = await app.state.gw.readiness.check()
        wire = {name: check.model_dump() for name, check in checks.items()}
        failing = app.state.gw.readiness.summary(checks)
        headers = {"cache-control": "no-store"}
        if failing is None:
            status = "degraded" if app.state.gw.readiness.degraded(checks) else "ready"  # a full store: still served
            return JSONResponse(ReadyBody(status=status, checks=checks).model_dump(), headers=headers)
        return JSONResponse({**NotReady(failing).to_wire(), "checks": wire}, status_code=503, headers=headers)

    # Off where FastAPI must handle each request itself: its operation spans, or dependencies of the app's.
    if not settings.gateway_telemetry and not app.router.dependencies:
        app.router.middleware_stack = querylane.QueryLanes(app.router.middleware_stack)  # past FastAPI's per-request work
    # Included as they are (no prefix added): their routes' templates are the app's, in its order.
    templates = [getattr(r, "path_format", "") for r in (*app.routes, *(r for router in routers for r in router.routes))]
    app.state.gw.requests.learn(t for t in templates if t)
    return app


def _telemetry(enabled: bool) -> TelemetryConfig:
    """FastAPI's OpenTelemetry instrumentation, all of it on or off (``gateway_telemetry``)."""
    return {"tracing": enabled, "metrics": enabled, "logs": enabled, "operation_spans": enabled}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CipherpoolError)
    async def typed(request: Request, exc: CipherpoolError) -> JSONResponse:
        if isinstance(exc, StoreFull):  # readiness shows the store full a while (any backend)
            request.app.state.gw.readiness.saw_full()
        request.app.state.gw.refusals.add(exc, request.scope.get("state"))
        return _json(exc)

    @app.exception_handler(ClientDisconnect)
    async def gone(_request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # The guard cut an oversize body off (and answered 413), or the client left: either
        # way nobody reads this answer, and it is no error of the gateway's.
        return _json(PayloadTooLarge("The body was cut off: it is larger than this endpoint's limit."))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5])
        refused = InvalidInput(f"Invalid request: {problems}")
        request.app.state.gw.refusals.add(refused, request.scope.get("state"))
        return _json(refused)

    @app.exception_handler(StarletteHTTPException)
    async def http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _json(NotFound("No such endpoint; see /docs."))
        body = {"code": HTTP_CODES.get(exc.status_code, "http_error"), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A dependency's outage: its typed 503; anything else: a fault of the gateway's."""
        typed = logged_outage(exc, request.method, request.url.path, log)
        if typed is not None:
            if isinstance(typed, StoreFull):
                request.app.state.gw.readiness.saw_full()
            return _json(typed)
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _json(RemoteError("The gateway failed unexpectedly; the operator's gateway log has the details."))

    # Registered for the outages' own types too: those handlers answer inside the app, so an
    # outage met by a route is not re-raised to the server (a traceback per request); the
    # handler of Exception is for one raised where they do not see it (a middleware).
    for kind in (*OUTAGE_TYPES, Exception):
        app.add_exception_handler(kind, unexpected)


def _json(exc: CipherpoolError) -> JSONResponse:
    status, headers, _ = error_body(exc)
    headers.pop("content-type")
    return JSONResponse(exc.to_wire(), status_code=status, headers=headers)
