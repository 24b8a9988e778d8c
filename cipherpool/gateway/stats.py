"""Provider endpoint for query figures per model and worker (bearer API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from cipherpool.api.schemas import NAME_PATTERN, ModelStats
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.monitoring import stats as stats_service
from cipherpool.monitoring.timings import MAX_WINDOW_S
from cipherpool.services import accounts

router = APIRouter(prefix="/v1", tags=["provider"])


@router.get("/stats", response_model=list[ModelStats])
async def model_stats(
    gw: Gateway,
    acct: Account,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    window_s: Annotated[int | None, Query(ge=60, le=MAX_WINDOW_S)] = None,
    last: Annotated[int | None, Query(ge=1, le=200)] = None,
) -> list[ModelStats]:
    """Per model, and per worker of it: average query time over the window (``window_s``,
    whole minutes; default ``CIPHERPOOL_STATS_WINDOW_S``) and all-time, current query time
    (the ``last`` latest queries), queue wait apart from compute, queries per minute, error
    and refusal rates, what waits in its queue and its workers by status."""
    return await run_in_threadpool(_collect, gw, acct.account_id, model, window_s, last)


def _collect(gw: GatewayState, account_id: str, name: str | None, window_s: int | None, last: int | None) -> list[ModelStats]:
    window = stats_service.check_window(window_s or gw.settings.stats_window_s)
    with gw.ctx.session() as session:
        account = accounts.get_account(session, account_id)
        return [
            stats_service.model_stats(
                session, gw.store.redis, gw.celery, model, window_s=window, last=last or gw.settings.stats_recent
            )
            for model in stats_service.models_of(session, account, name)
        ]
