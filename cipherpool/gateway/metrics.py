"""``GET /metrics``: the platform's Prometheus metrics, for the operator's scraper.

The figures span every account, so the endpoint answers one credential only, the operator's
``CIPHERPOOL_METRICS_TOKEN`` as a bearer (compared in constant time), never an account's key
or a token. Unset, the endpoint is off and answers 404 exactly as an unknown path does. The
guard lets the path through without an account (:data:`~cipherpool.gateway.guard.SELF_AUTHENTICATED_PATHS`):
it would refuse the metrics token as an unknown API key. It is left out of the OpenAPI page,
which is the providers' and end users' API.

What is exported and how it is read: :mod:`cipherpool.monitoring.exporter`. Each scrape builds
a registry of its own around one collector and renders it in a worker thread, because reading
the database, Redis and the broker blocks. This process's own HTTP request metrics
(:mod:`cipherpool.gateway.httpmetrics`) and its key-affinity routing decisions
(:mod:`cipherpool.gateway.affinity`) are rendered with them.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from starlette.concurrency import run_in_threadpool

from cipherpool.errors import AuthError, NotFound
from cipherpool.gateway.affinity import RouterCollector
from cipherpool.gateway.deps import Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.monitoring.exporter import PlatformCollector

PATH = "/metrics"
router = APIRouter(tags=["platform"])


def check_scraper(expected: str | None, authorization: str | None) -> None:
    """Admit a bearer of the metrics token; 404 when there is none (the endpoint is off)."""
    if not expected:
        raise NotFound("No such endpoint; see /docs.")
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected.encode()):
        raise AuthError("Missing or wrong metrics token: send `Authorization: Bearer <CIPHERPOOL_METRICS_TOKEN>`.")


class _Of:
    """Another registry's metrics, collected into the scrape's."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


def render(gw: GatewayState) -> bytes:
    """The exposition text, read now (blocking: run it in a thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(gw.ctx, gw.celery))
    registry.register(_Of(gw.requests.registry))
    if gw.router is not None:
        registry.register(RouterCollector(gw.router))
    return generate_latest(registry)


@router.get(PATH, include_in_schema=False)
async def metrics(request: Request, gw: Gateway) -> Response:
    check_scraper(gw.settings.metrics_token, request.headers.get("authorization"))
    return Response(await run_in_threadpool(render, gw), media_type=CONTENT_TYPE_LATEST)
