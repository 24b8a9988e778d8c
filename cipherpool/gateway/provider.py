"""Provider endpoints (bearer API key): models, tokens, workers.

Each route is decode (pydantic, or a streamed body) -> authorise (the guard and the
``Account`` dependency) -> service call -> typed response.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from cipherpool import lifecycle
from cipherpool.api.schemas import (
    ID_PATTERN, NAME_PATTERN, DeployIn, ModelOut, TokenCreated, TokenIn, TokenOut, UploadOut, WorkerIn, WorkerOut,
    WorkerStats,
)
from cipherpool.db.tables import Model, ModelStatus, NodeStatus, Worker
from cipherpool.dispatch import send_to_node
from cipherpool.names import STATS_TASK
from cipherpool.errors import QueryTimeout, WorkerNotFound
from cipherpool.fhe.deployment import check_pair
from cipherpool.gateway.auth import AccountPrincipal
from cipherpool.gateway.deps import BINARY_BODY, Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.gateway.uploads import stream_into_store
from cipherpool.messages import unwrap
from cipherpool.services import accounts, models, tokens
from cipherpool.services import workers as worker_service
from cipherpool.statuses import WorkerStatus
from cipherpool.store import BlobKind

router = APIRouter(prefix="/v1", tags=["provider"])
ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]
ObjectId = Annotated[str, Path(pattern=ID_PATTERN)]
ModelFilter = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.put("/uploads", response_model=UploadOut, status_code=201, openapi_extra=BINARY_BODY)
async def upload_artifact(request: Request, gw: Gateway, acct: Account) -> UploadOut:
    """Stage a deployment artifact (client.zip or server.zip) for a deploy within the hour."""
    upload = await stream_into_store(request, gw.store, gw.settings.upload_ttl_s)
    await run_in_threadpool(gw.store.stage, upload.key, acct.account_id, upload.sha256, gw.settings.upload_ttl_s)
    return UploadOut(upload_id=upload.sha256, size_bytes=upload.size, expires_in_s=gw.settings.upload_ttl_s)


@router.post("/models", response_model=ModelOut, status_code=201)
def deploy_model(body: DeployIn, gw: Gateway, acct: Account) -> ModelOut:
    """Register staged artifacts as a model (not yet active). The zips are checked without
    being extracted: members, declared sizes (zip bombs), concrete versions."""
    with gw.ctx.session() as session:
        accounts.get_account(session, acct.account_id)  # authorise before reading anything
    client_zip = gw.store.get_staged(acct.account_id, body.client_upload)
    server_zip = gw.store.get_staged(acct.account_id, body.server_upload)
    versions = check_pair(client_zip, server_zip, max_unzipped_bytes=gw.settings.max_deployment_unzipped_bytes)
    del client_zip, server_zip
    with gw.ctx.session() as session:
        model = models.deploy_model(
            session, accounts.get_account(session, acct.account_id), body.name, client_blob=body.client_upload,
            server_blob=body.server_upload, versions=versions, hardware=body.hardware,
        )
        for kind, blob in ((BlobKind.CLIENT_ZIP, body.client_upload), (BlobKind.SERVER_ZIP, body.server_upload)):
            if not gw.store.exists(kind, blob):
                gw.store.adopt(gw.store.staged_key(acct.account_id, blob), kind, blob)
        return models.describe(model)


@router.get("/models", response_model=list[ModelOut])
def list_models(gw: Gateway, acct: Account) -> list[ModelOut]:
    with gw.ctx.session() as session:
        return [models.describe(m) for m in models.list_models(session, accounts.get_account(session, acct.account_id))]


def _set_status(gw: GatewayState, acct: AccountPrincipal, name: str, status: ModelStatus) -> ModelOut:
    with gw.ctx.session() as session:
        described = models.describe(models.set_status(session, accounts.get_account(session, acct.account_id), name, status))
    gw.auth.forget()
    return described


@router.post("/models/{name}/activate", response_model=ModelOut)
def activate_model(name: ModelName, gw: Gateway, acct: Account) -> ModelOut:
    return _set_status(gw, acct, name, ModelStatus.ACTIVE)


@router.post("/models/{name}/deactivate", response_model=ModelOut)
def deactivate_model(name: ModelName, gw: Gateway, acct: Account) -> ModelOut:
    return _set_status(gw, acct, name, ModelStatus.INACTIVE)


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def create_token(body: TokenIn, gw: Gateway, acct: Account) -> TokenCreated:
    """A new access token for one model; its value is in this answer and nowhere else."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        token, value = tokens.create_token(session, account, body.name, body.model, body.ttl_s)
        return TokenCreated(**tokens.describe(token, body.model).model_dump(), token=value)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(gw: Gateway, acct: Account) -> list[TokenOut]:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [tokens.describe(t, _model_name(session, t.model_id)) for t in tokens.list_tokens(session, account)]


@router.post("/tokens/{token_id}/revoke", response_model=TokenOut)
def revoke_token(token_id: ObjectId, gw: Gateway, acct: Account) -> TokenOut:
    with gw.ctx.session() as session:
        token = tokens.revoke_token(session, accounts.get_account(session, acct.account_id), token_id)
        described = tokens.describe(token, _model_name(session, token.model_id))
    gw.auth.forget()
    return described


@router.post("/workers", response_model=WorkerOut, status_code=201)
def start_worker(body: WorkerIn, gw: Gateway, acct: Account) -> WorkerOut:
    """Bind a free pool node to the model; poll the worker until it is running or failed."""
    worker = lifecycle.start_worker(gw.ctx, gw.celery, acct.account_id, body.model)
    return _describe_worker(gw, worker.id)


@router.get("/workers", response_model=list[WorkerOut])
def list_workers(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[WorkerOut]:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [worker_service.describe(session, w) for w in worker_service.list_workers(session, account, model)]


@router.get("/workers/stats", response_model=list[WorkerStats])
async def worker_stats(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[WorkerStats]:
    """Live figures of each running worker: its own query counts and times (this binding
    only), its node's lifetime figures apart, and the node's key cache."""
    running = await run_in_threadpool(list_workers, gw, acct, model)
    stats = []
    for worker in running:
        if worker.status != WorkerStatus.RUNNING or worker.node_status != NodeStatus.ONLINE.value:
            continue
        sent = await run_in_threadpool(send_to_node, gw.celery, worker.node, STATS_TASK)
        meta = await gw.waiter.wait(sent.id, gw.settings.management_timeout_s)
        if not meta or meta.get("status") != "SUCCESS":
            raise QueryTimeout(f"Node {worker.node} did not report its figures in time.")
        report = WorkerStats.model_validate(unwrap(meta.get("result")))
        if report.worker_id == worker.id:  # the node may have moved on since the listing
            stats.append(report)
    return stats


@router.get("/workers/{worker_id}", response_model=WorkerOut)
def get_worker(worker_id: ObjectId, gw: Gateway, acct: Account) -> WorkerOut:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return worker_service.describe(session, worker_service.get_worker(session, account, worker_id))


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


def _model_name(session: Session, model_id: str) -> str:
    model = session.get(Model, model_id)
    return model.name if model else "?"
