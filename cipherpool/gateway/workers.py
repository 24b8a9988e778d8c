"""Provider endpoints for workers (bearer API key): start, list, show, live figures, standby,
resume, logs, stop; and the pool's nodes as a provider may see them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from cipherpool import lifecycle, workerlog
from cipherpool.api.schemas import ID_PATTERN, NAME_PATTERN, NodeOut, WorkerIn, WorkerLogLine, WorkerOut, WorkerStats
from cipherpool.db.tables import Model, NodeStatus, Worker
from cipherpool.dispatch import send_to_node
from cipherpool.errors import QueryTimeout, WorkerNotFound
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.messages import unwrap
from cipherpool.monitoring import stats as monitoring
from cipherpool.names import STATS_TASK
from cipherpool.services import accounts
from cipherpool.services import nodes as node_service
from cipherpool.services import workers as worker_service
from cipherpool.statuses import WorkerStatus

router = APIRouter(prefix="/v1", tags=["provider"])
ObjectId = Annotated[str, Path(pattern=ID_PATTERN)]
ModelFilter = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.post("/workers", response_model=list[WorkerOut], status_code=201)
def start_workers(body: WorkerIn, gw: Gateway, acct: Account) -> list[WorkerOut]:
    """Bind ``count`` free pool nodes of the model's class to it (all or none); poll each
    worker until it is up (or standby) or failed. Refused with the reason: model not active,
    ``max_workers`` reached, no free node of the class, labels or profile."""
    workers = lifecycle.start_workers(
        gw.ctx, gw.celery, acct.account_id, body.model, count=body.count, profile=body.profile, standby=body.standby
    )
    return [_describe_worker(gw, worker.id) for worker in workers]


@router.get("/nodes", response_model=list[NodeOut])
def list_nodes(gw: Gateway, acct: Account) -> list[NodeOut]:
    """Every pool node: profile, class, labels, capacity and allocatable, status, heartbeat
    age; the model and worker only where they are this account's."""
    with gw.ctx.session() as session:
        accounts.get_account(session, acct.account_id)
        return node_service.list_nodes(
            session,
            gw.settings.node_heartbeat_s,
            acct.account_id,
            held=lambda node: node_service.published_models(gw.ctx.store.redis, node),
        )


@router.get("/workers", response_model=list[WorkerOut])
def list_workers(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[WorkerOut]:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [worker_service.describe(session, w) for w in worker_service.list_workers(session, account, model)]


@router.get("/workers/stats", response_model=list[WorkerStats])
async def worker_stats(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[WorkerStats]:
    """Live figures of each running worker: its own query counts and times (this binding
    only) and its model's key cache on the node; with its recorded query times over
    ``CIPHERPOOL_STATS_WINDOW_S`` and now, and its model's queue depth. Never the node's
    lifetime figures: they count other accounts' work on the node (the operator's view)."""
    running = await run_in_threadpool(list_workers, gw, acct, model)
    stats = []
    for worker in running:
        if worker.status != WorkerStatus.UP or worker.node_status != NodeStatus.ONLINE.value:
            continue
        sent = await run_in_threadpool(send_to_node, gw.celery, worker.node, STATS_TASK)
        meta = await gw.waiter.wait(sent.id, gw.settings.management_timeout_s)
        if not meta or meta.get("status") != "SUCCESS":
            raise QueryTimeout(f"Node {worker.node} did not report its figures in time.")
        report = WorkerStats.model_validate(unwrap(meta.get("result"))).provider_view()
        if report.worker_id == worker.id:  # the node may have moved on since the listing
            stats.append(await run_in_threadpool(_with_timings, gw, acct.account_id, report))
    return stats


def _with_timings(gw: GatewayState, account_id: str, report: WorkerStats) -> WorkerStats:
    with gw.ctx.session() as session:
        model = session.get(Model, report.model_id or "")
        if model is None or model.account_id != account_id:
            return report
    return monitoring.with_timings(
        report, gw.store.redis, gw.celery, model, window_s=gw.settings.stats_window_s, last=gw.settings.stats_recent
    )


@router.get("/workers/{worker_id}", response_model=WorkerOut)
def get_worker(worker_id: ObjectId, gw: Gateway, acct: Account) -> WorkerOut:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return worker_service.describe(session, worker_service.get_worker(session, account, worker_id))


@router.post("/workers/{worker_id}/standby", response_model=WorkerOut)
def standby_worker(worker_id: ObjectId, gw: Gateway, acct: Account) -> WorkerOut:
    """Stop consuming but keep the model loaded (resumed at once); poll until ``standby``."""
    return _describe_worker(gw, lifecycle.set_standby(gw.ctx, gw.celery, acct.account_id, worker_id, True).id)


@router.post("/workers/{worker_id}/resume", response_model=WorkerOut)
def resume_worker(worker_id: ObjectId, gw: Gateway, acct: Account) -> WorkerOut:
    """Consume again after standby; poll until ``up``."""
    return _describe_worker(gw, lifecycle.set_standby(gw.ctx, gw.celery, acct.account_id, worker_id, False).id)


@router.get("/workers/{worker_id}/logs", response_model=list[WorkerLogLine])
def worker_logs(worker_id: ObjectId, gw: Gateway, acct: Account, after: Annotated[int, Query(ge=-1)] = -1) -> list[WorkerLogLine]:
    """The worker's log lines after line ``after`` (load, errors, standby, stop)."""
    with gw.ctx.session() as session:
        worker_service.get_worker(session, accounts.get_account(session, acct.account_id), worker_id)
    return [WorkerLogLine(**vars(line)) for line in workerlog.read(gw.store.redis, worker_id, after)]


@router.post("/workers/{worker_id}/stop", response_model=WorkerOut)
def stop_worker(worker_id: ObjectId, gw: Gateway, acct: Account) -> WorkerOut:
    """Unbind: the node stops consuming, queries in flight finish; poll until stopped."""
    worker = lifecycle.stop_worker(gw.ctx, gw.celery, acct.account_id, worker_id)
    return _describe_worker(gw, worker.id)


def _describe_worker(gw: GatewayState, worker_id: str) -> WorkerOut:
    with gw.ctx.session() as session:
        worker = session.get(Worker, worker_id)
        if worker is None:
            raise WorkerNotFound(f"No worker {worker_id!r}.")
        return worker_service.describe(session, worker)
