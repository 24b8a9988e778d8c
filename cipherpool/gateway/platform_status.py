"""``GET /v1/platform/status``: the platform's own health, for the operator.

The same view as `cipherpool status` (:mod:`cipherpool.monitoring.components`): gateways,
control workers, beat and its jobs, pool nodes, Redis and the database, each ok, late or
missing, and the latest platform events (``?events=N``, default 10, at most 1000). It names
hosts and nodes of the whole platform, so it answers the operator's credential only: the
metrics token, as ``/metrics`` does (404 while that is unset, 401 for anything else, an
account's key or a token included), and it is not on the OpenAPI page. The guard lets the
path through unauthenticated (:data:`~cipherpool.gateway.guard.SELF_AUTHENTICATED_PATHS`),
the check below is its only door.

``GET /v1/platform/nodes/{node}/stats`` (the same token) is a node's live figures with its
lifetime counts (``node_lifetime``: every binding the node process served, whichever account's),
which a provider's ``GET /v1/workers/stats`` never shows.
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from cipherpool.api.schemas import PlatformStatus, WorkerStats
from cipherpool.db.tables import PoolNode
from cipherpool.dispatch import send_to_node
from cipherpool.errors import InvalidInput, NotFound, QueryTimeout
from cipherpool.gateway.deps import Gateway
from cipherpool.gateway.metrics import check_scraper
from cipherpool.gateway.state import GatewayState
from cipherpool.messages import unwrap
from cipherpool.monitoring.components import DEFAULT_EVENTS, read_status
from cipherpool.monitoring.platform_events import EVENTS_KEPT
from cipherpool.names import STATS_TASK

PATH = "/v1/platform/status"
NODE_STATS_PATH = "/v1/platform/nodes/{node}/stats"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._-]{0,254}")  # a Celery node name, e.g. node1@host
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


@router.get(NODE_STATS_PATH, include_in_schema=False, response_model=WorkerStats)
async def node_stats(node: str, request: Request, gw: Gateway) -> WorkerStats:
    """A pool node's live figures, its lifetime counts included (the operator's only)."""
    check_scraper(gw.settings.metrics_token, request.headers.get("authorization"))
    if not NODE_NAME.fullmatch(node) or not await run_in_threadpool(_known, gw, node):
        raise NotFound(f"No pool node {node[:100]!r}.")
    sent = await run_in_threadpool(send_to_node, gw.celery, node, STATS_TASK)
    meta = await gw.waiter.wait(sent.id, gw.settings.management_timeout_s)
    if not meta or meta.get("status") != "SUCCESS":
        raise QueryTimeout(f"Node {node} did not report its figures in time.")
    return WorkerStats.model_validate(unwrap(meta.get("result")))


def _known(gw: GatewayState, node: str) -> bool:
    with gw.ctx.session() as session:
        return session.get(PoolNode, node) is not None
