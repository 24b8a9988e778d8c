"""Provider endpoints for models (bearer API key): deploy, show, update, versions, rollback,
delete, activation, and the model's event log.

Each route is decode (pydantic, or a streamed body) -> authorise (the guard and the
``Account`` dependency) -> service call -> typed response.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from cipherpool import lifecycle
from cipherpool.api.schemas import (
    EVENT_ID_PATTERN,
    NAME_PATTERN,
    DeployIn,
    EventOut,
    ModelDetail,
    ModelOut,
    ModelSettings,
    RollbackIn,
    UploadOut,
    VersionIn,
    VersionOut,
)
from cipherpool.db.tables import Model, ModelStatus
from cipherpool.fhe.deployment import check_pair, compiled_backend, input_spec
from cipherpool.gateway.auth import AccountPrincipal
from cipherpool.gateway.deps import BINARY_BODY, Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.gateway.uploads import stream_into_store
from cipherpool.monitoring import timings
from cipherpool.services import accounts, events, models
from cipherpool.services import workers as worker_service
from cipherpool.services.events import MAX_EVENTS
from cipherpool.services.models import Artifact
from cipherpool.store import BlobKind

router = APIRouter(prefix="/v1", tags=["provider"])
ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]


@router.put("/uploads", response_model=UploadOut, status_code=201, openapi_extra=BINARY_BODY)
async def upload_artifact(request: Request, gw: Gateway, acct: Account) -> UploadOut:
    """Stage a deployment artifact (client.zip or server.zip) for a deploy within the hour."""
    upload = await stream_into_store(request, gw.store, gw.settings.upload_ttl_s)
    await run_in_threadpool(gw.store.stage, upload.key, acct.account_id, upload.sha256, gw.settings.upload_ttl_s)
    return UploadOut(upload_id=upload.sha256, size_bytes=upload.size, expires_in_s=gw.settings.upload_ttl_s)


@router.post("/models", response_model=ModelDetail, status_code=201)
def deploy_model(body: DeployIn, gw: Gateway, acct: Account) -> ModelDetail:
    """Register staged artifacts as version 1 of a new model (not yet active). The zips are
    checked without being extracted: members, declared sizes (zip bombs), concrete versions."""
    artifact = _artifact(gw, acct, body.client_upload, body.server_upload)
    with gw.ctx.session() as session:
        model = models.deploy_model(
            session,
            accounts.get_account(session, acct.account_id),
            body.name,
            artifact,
            hardware=body.hardware,
            description=body.description,
            min_workers=body.min_workers,
            max_workers=body.max_workers,
            shared=body.shared,
            node_selector=body.node_selector,
        )
        _adopt(gw, acct, artifact)
        return models.detail(session, model, 0)


@router.get("/models", response_model=list[ModelOut])
def list_models(gw: Gateway, acct: Account) -> list[ModelOut]:
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [models.describe(session, m) for m in models.list_models(session, account)]


@router.get("/models/{name}", response_model=ModelDetail)
def show_model(name: ModelName, gw: Gateway, acct: Account) -> ModelDetail:
    """Settings, status, every version, the serving artifact, input shape, running workers."""
    with gw.ctx.session() as session:
        return _detail(session, models.get_model(session, accounts.get_account(session, acct.account_id), name))


@router.patch("/models/{name}", response_model=ModelDetail)
def update_model(name: ModelName, body: ModelSettings, gw: Gateway, acct: Account) -> ModelDetail:
    """Change the settings sent (description, hardware, min/max workers, shared)."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        model = models.update_settings(session, account, name, body.model_dump(include=body.model_fields_set))
        return _detail(session, model)


@router.get("/models/{name}/versions", response_model=list[VersionOut])
def list_versions(name: ModelName, gw: Gateway, acct: Account) -> list[VersionOut]:
    with gw.ctx.session() as session:
        model = models.get_model(session, accounts.get_account(session, acct.account_id), name)
        return [models.describe_version(model, v) for v in models.list_versions(session, model)]


@router.post("/models/{name}/versions", response_model=ModelDetail, status_code=201)
def deploy_version(name: ModelName, body: VersionIn, gw: Gateway, acct: Account) -> ModelDetail:
    """Add a version from staged artifacts and roll it out: serving workers load it one at a
    time and keep answering; queries switch to it once every worker holds it."""
    with gw.ctx.session() as session:
        models.get_model(session, accounts.get_account(session, acct.account_id), name)  # authorise first
    artifact = _artifact(gw, acct, body.client_upload, body.server_upload)
    with gw.ctx.session() as session:
        model = models.add_version(session, accounts.get_account(session, acct.account_id), name, artifact, body.note)
        _adopt(gw, acct, artifact)
        model_id = model.id
    return _after_rollout_begins(gw, acct, name, model_id)


@router.post("/models/{name}/rollback", response_model=ModelDetail)
def rollback(name: ModelName, body: RollbackIn, gw: Gateway, acct: Account) -> ModelDetail:
    """Serve an earlier version again (default: the one before), rolled out the same way."""
    with gw.ctx.session() as session:
        model_id = models.rollback(session, accounts.get_account(session, acct.account_id), name, body.version).id
    return _after_rollout_begins(gw, acct, name, model_id)


@router.delete("/models/{name}", status_code=204)
def delete_model(name: ModelName, gw: Gateway, acct: Account) -> Response:
    """Delete a model, its versions, keys and events; refused while workers run. Blobs that
    no other model or key set uses are removed from the store by beat's key sweep, after
    CIPHERPOOL_BLOB_SWEEP_GRACE_S."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        model_id = models.get_model(session, account, name).id
        models.delete_model(session, account, name)
    gw.auth.changed()
    timings.forget(gw.store.redis, model_id)  # its recorded query times (minutes expire alone)
    return Response(status_code=204)


def _set_status(gw: GatewayState, acct: AccountPrincipal, name: str, status: ModelStatus) -> ModelOut:
    with gw.ctx.session() as session:
        model = models.set_status(session, accounts.get_account(session, acct.account_id), name, status)
        described = models.describe(session, model)
    gw.auth.changed()
    return described


@router.post("/models/{name}/activate", response_model=ModelOut)
def activate_model(name: ModelName, gw: Gateway, acct: Account) -> ModelOut:
    return _set_status(gw, acct, name, ModelStatus.ACTIVE)


@router.post("/models/{name}/deactivate", response_model=ModelOut)
def deactivate_model(name: ModelName, gw: Gateway, acct: Account) -> ModelOut:
    return _set_status(gw, acct, name, ModelStatus.INACTIVE)


@router.get("/models/{name}/events", response_model=list[EventOut])
def model_events(
    name: ModelName,
    gw: Gateway,
    acct: Account,
    after: Annotated[str | None, Query(pattern=EVENT_ID_PATTERN, description="events after this event (an id it listed)")] = None,
    since: Annotated[datetime | None, Query(description="events at or after this time (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = MAX_EVENTS,
) -> list[EventOut]:
    """The model's event log, oldest first; poll with ``after`` = the last id seen to follow it."""
    with gw.ctx.session() as session:
        model = models.get_model(session, accounts.get_account(session, acct.account_id), name)
        return [events.describe(e, model.name) for e in events.list_events(session, model, after=after, since=since, limit=limit)]


def _artifact(gw: GatewayState, acct: AccountPrincipal, client_upload: str, server_upload: str) -> Artifact:
    """This account's staged client.zip and server.zip, checked (versions, sizes, members)."""
    with gw.ctx.session() as session:
        accounts.get_account(session, acct.account_id)  # authorise before reading anything
    client_zip = gw.store.get_staged(acct.account_id, client_upload)
    server_zip = gw.store.get_staged(acct.account_id, server_upload)
    versions = check_pair(client_zip, server_zip, max_unzipped_bytes=gw.settings.max_deployment_unzipped_bytes)
    return Artifact(
        client_upload,
        server_upload,
        len(client_zip),
        len(server_zip),
        versions,
        input_spec(client_zip),
        compiled_backend(server_zip),
    )


def _adopt(gw: GatewayState, acct: AccountPrincipal, artifact: Artifact) -> None:
    """Staged uploads become content-addressed blobs (no TTL): a version row owns them now."""
    for kind, blob in ((BlobKind.CLIENT_ZIP, artifact.client_blob), (BlobKind.SERVER_ZIP, artifact.server_blob)):
        if not gw.store.exists(kind, blob):
            gw.store.adopt(gw.store.staged_key(acct.account_id, blob), kind, blob)


def _after_rollout_begins(gw: GatewayState, acct: AccountPrincipal, name: str, model_id: str) -> ModelDetail:
    lifecycle.roll_out(gw.ctx, gw.celery, model_id)
    gw.auth.changed()  # grants carry the serving version
    with gw.ctx.session() as session:
        return _detail(session, models.get_model(session, accounts.get_account(session, acct.account_id), name))


def _detail(session: Session, model: Model) -> ModelDetail:
    return models.detail(session, model, worker_service.running_count(session, model.id))
