"""``GET /v1/platform/status``: the platform's own health, for the operator.

The same view as `cipherpool status` (:mod:`cipherpool.monitoring.components`): gateways,
control workers, beat and its jobs, pool nodes, Redis and the database, each ok, late or
missing, and the latest platform events (``?events=N``, default 10, at most 1000). It names
hosts and nodes of the whole platform, so it answers the operator's credential only: the
metrics token, as ``/metrics`` does (404 while that is unset, 401 for anything else, an
account's key or a token included), and it is not on the OpenAPI page. The guard lets the
path through unauthenticated (:data:`~cipherpool.gateway.guard.SELF_AUTHENTICATED_PATHS`),
the check below is its only door.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from cipherpool.api.schemas import PlatformStatus
from cipherpool.errors import InvalidInput
from cipherpool.gateway.deps import Gateway
from cipherpool.gateway.metrics import check_scraper
from cipherpool.monitoring.components import DEFAULT_EVENTS, read_status
from cipherpool.monitoring.platform_events import EVENTS_KEPT

PATH = "/v1/platform/status"
router = APIRouter(tags=["platform"])


def events_asked(raw: str | None) -> int:
    """``?events=`` (read after the credential, so a stranger learns nothing from a 400)."""
    if raw is None:
        return DEFAULT_EVENTS
    if not (raw.isascii() and raw.isdigit()) or int(raw) > EVENTS_KEPT:
        raise InvalidInput(f"events: a whole number from 0 to {EVENTS_KEPT}.")
    return int(raw)


@router.get(PATH, include_in_schema=False, response_model=PlatformStatus)
async def platform_status(request: Request, gw: Gateway) -> PlatformStatus:
    check_scraper(gw.settings.metrics_token, request.headers.get("authorization"))
    events = events_asked(request.query_params.get("events"))
    return await run_in_threadpool(read_status, gw.ctx, time.time(), events)
