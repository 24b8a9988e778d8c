"""End-user endpoints (bearer access token): the models a token queries, their client specs,
and evaluation keys.

A token assigned to one model needs no ``?model=``; one assigned to several names the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from celery.result import AsyncResult
from fastapi import APIRouter, Path, Query, Request, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from cipherpool.api.schemas import (
    KEY_ID_PATTERN,
    NAME_PATTERN,
    SHA256_PATTERN,
    ClientModelOut,
    KeyOut,
    KeySetOut,
    WarmupOut,
)
from cipherpool.db.tables import Model
from cipherpool.dispatch import admit_ciphertext, open_envelope, send_warmups
from cipherpool.errors import CipherpoolError, InvalidEvaluationKey, KeyMismatch, ModelNotFound
from cipherpool.fhe.framing import capnp_message_length, header_bytes_needed
from cipherpool.gateway.affinity import homes
from cipherpool.gateway.deps import BINARY_BODY, BINARY_RESPONSE, OCTET_STREAM, Gateway, Grant
from cipherpool.gateway.refusals import note_model
from cipherpool.gateway.results import TaskMeta
from cipherpool.gateway.state import GatewayState
from cipherpool.gateway.uploads import Upload, stream_into_store
from cipherpool.messages import EncryptedInput, unwrap
from cipherpool.services import keysets, keyuse, queries, usage
from cipherpool.services import workers as worker_service
from cipherpool.services.keysets import KeyQuotas
from cipherpool.services.models import current_version
from cipherpool.services.nodes import node_is_live
from cipherpool.services.queries import ModelGrant, TokenGrant
from cipherpool.statuses import WorkerStatus
from cipherpool.store import BlobKind

router = APIRouter(prefix="/v1/client", tags=["end user"])
KeyId = Annotated[str, Path(pattern=KEY_ID_PATTERN)]
ModelChoice = Annotated[str | None, Query(pattern=NAME_PATTERN, description="needed when the token has several models")]
Specs = Annotated[str | None, Query(pattern=SHA256_PATTERN, description="sha256 of the client.zip the keys were made from")]


@router.get("/models", response_model=list[ClientModelOut])
def list_models(gw: Gateway, grant: Grant) -> list[ClientModelOut]:
    """The models this token may query."""
    with gw.ctx.session() as session:
        return [_describe(session, _model(session, m), gw.settings.key_warmup) for m in grant.models]


@router.get("/model", response_model=ClientModelOut)
def describe_model(gw: Gateway, grant: Grant, model: ModelChoice = None) -> ClientModelOut:
    """A model this token queries: its serving version, client specs digest, and how many
    workers serve it."""
    with gw.ctx.session() as session:
        return _describe(session, _model(session, queries.pick_model(grant, model)), gw.settings.key_warmup)


@router.get("/model/client.zip", response_class=Response, responses={200: BINARY_RESPONSE})
def client_zip(gw: Gateway, grant: Grant, model: ModelChoice = None) -> Response:
    """The serving version's client specs, from which the client generates its keys."""
    with gw.ctx.session() as session:
        blob = current_version(session, _model(session, queries.pick_model(grant, model))).client_blob
    return Response(gw.store.get(BlobKind.CLIENT_ZIP, blob), media_type=OCTET_STREAM)


@router.put("/keys/{key_id}", response_model=KeyOut, status_code=201, openapi_extra=BINARY_BODY)
async def upload_key(
    key_id: KeyId, request: Request, gw: Gateway, grant: Grant, model: ModelChoice = None, specs: Specs = None
) -> KeyOut:
    """Upload the evaluation key of key set ``key_id`` (streamed; stored once per content),
    generated from client specs ``specs`` (refused if the model serves others now).

    Only the Cap'n Proto segment table is read back (a few bytes) to refuse a truncated key:
    concrete's reader never returns on one."""
    target = queries.pick_model(grant, model)
    note_model(request, target)
    queries.check_specs(target, specs)
    await run_in_threadpool(_check_room, gw, grant, key_id, _declared_length(request))
    upload = await stream_into_store(request, gw.store, gw.settings.upload_ttl_s)
    try:
        head = await run_in_threadpool(gw.store.upload_head, upload.key, 8)
        head = await run_in_threadpool(gw.store.upload_head, upload.key, header_bytes_needed(head))
        if capnp_message_length(head) != upload.size:
            raise InvalidEvaluationKey("The evaluation key is truncated or corrupt; upload it again.")
    except BaseException:
        await run_in_threadpool(gw.store.discard_upload, upload.key)
        raise
    await run_in_threadpool(_register, gw, grant, target.name, key_id, upload, specs)
    return KeyOut(key_id=key_id, blob_id=upload.sha256, size_bytes=upload.size)


@router.get("/keys", response_model=list[KeySetOut])
def list_keys(gw: Gateway, grant: Grant) -> list[KeySetOut]:
    """This token's key sets, oldest first: the model and version each was made for, its size,
    last use, and when it expires unused (``key_idle_expiry_s``); ``status`` is ``active``,
    ``outdated`` (made from client specs the model no longer serves) or ``expired``."""
    with gw.ctx.session() as session:
        key_ids = keysets.key_ids(session, grant.token_id)
    uses = keyuse.read(gw.store.redis, grant.token_id, key_ids)  # uses beat has not flushed yet
    with gw.ctx.session() as session:
        return keysets.list_key_sets(session, grant.token_id, uses, gw.settings.key_idle_expiry_s)


@router.delete("/keys/{key_id}", status_code=204)
def delete_key(key_id: KeyId, gw: Gateway, grant: Grant) -> Response:
    """Delete this token's key set ``key_id`` (its evaluation key leaves the store with beat's
    next key sweep after the grace period, where no other key set shares it). Another token's
    key set is not found, as one that does not exist."""
    with gw.ctx.session() as session:
        keysets.delete_key_set(session, grant.token_id, key_id)
    gw.auth.forget()  # this gateway's key cache (others': within auth_cache_ttl_s; the blob outlives that)
    return Response(status_code=204)


@router.post("/keys/{key_id}/warmup", response_model=WarmupOut, openapi_extra=BINARY_BODY)
async def warm_key(key_id: KeyId, request: Request, gw: Gateway, grant: Grant) -> WarmupOut:
    """Warm key set ``key_id`` on the dedicated nodes its queries go to (its homes, with key
    affinity on; else every dedicated node serving the model): each runs the body (a
    throwaway ciphertext under that key set, e.g. of zeros) once and drops the result, so the
    key is deserialized and used before the client's first query. Answers when they are done
    (or after ``key_warmup_timeout_s``); with warm-up off, at once with nothing done.

    Each node's run counts against the token's quota and rate as a query does (429
    ``token_quota_exceeded`` when the quota has no room left); a node that ran nothing (its
    key cached already) is given back."""
    body = await request.body()
    envelope, model = open_envelope(grant, body, wait_for_worker=True, noted=lambda named: note_model(request, named))
    if envelope.key_id != key_id:
        raise KeyMismatch("This ciphertext was encrypted under another key set than the one named in the path.")
    if not gw.settings.key_warmup:
        return WarmupOut(nodes=0, warmed=0, seconds=0.0)
    sent = await run_in_threadpool(_send_warmups, gw, grant, model, envelope, body)
    started = time.monotonic()
    metas = await asyncio.gather(*(gw.waiter.wait(task.id, gw.settings.key_warmup_timeout_s) for task in sent))
    idle = sum(map(_ran_nothing, metas))
    if idle:
        await run_in_threadpool(usage.refund, gw.store.redis, grant.token_id, idle)
    return WarmupOut(nodes=len(sent), warmed=sum(map(_warmed, metas)), seconds=round(time.monotonic() - started, 3))


def _warmed(meta: TaskMeta | None) -> bool:
    if not meta or meta.get("status") != "SUCCESS":
        return False
    try:
        unwrap(meta.get("result"))  # a node's typed refusal (it was unbound meanwhile) raises here
    except CipherpoolError:
        return False
    return True


def _ran_nothing(meta: TaskMeta | None) -> bool:
    """The node answered that it ran no evaluation: the key was cached already, or it refused."""
    if not meta or meta.get("status") != "SUCCESS":
        return False  # no answer in time: it may have run
    try:
        value = unwrap(meta.get("result"))
    except CipherpoolError:
        return True
    return isinstance(value, dict) and value.get("cached") is True


def _send_warmups(
    gw: GatewayState, grant: TokenGrant, model: ModelGrant, envelope: EncryptedInput, body: bytes
) -> list[AsyncResult]:
    admit_ciphertext(gw.store, model, envelope)  # as a query's, before anything is looked up or counted
    with gw.ctx.session() as session:
        blob_id = queries.key_blob(session, grant, model, envelope.key_id)
        nodes = [
            w.node_name
            for w in worker_service.serving(session, model_id=model.model_id)
            if w.status == WorkerStatus.UP and node_is_live(session, w.node_name, gw.settings.node_heartbeat_s)
        ]
    nodes = homes(gw.router, gw.settings, model.model_id, envelope.key_id, nodes)  # the key set's queries go there first
    if len(nodes) > 1:  # one FHE run per node: each counts against the rate (the request itself counted one)
        gw.limiter.hit(grant.account_id, grant.token_id, cost=len(nodes) - 1)
    return send_warmups(gw.celery, gw.settings, gw.store, grant, model, envelope, body, blob_id, nodes)


def _check_room(gw: GatewayState, grant: TokenGrant, key_id: str, declared: int | None) -> None:
    """Refuse an upload over the key-set cap, or (by its declared length) over a byte quota,
    before reading its body."""
    with gw.ctx.session() as session:
        queries.check_room(session, grant, key_id, gw.settings.max_keys_per_token, declared, _quotas(gw))


def _quotas(gw: GatewayState) -> KeyQuotas:
    return KeyQuotas(gw.settings.max_key_bytes_per_token, gw.settings.max_key_bytes_per_account)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None


def _register(gw: GatewayState, grant: TokenGrant, model_name: str, key_id: str, upload: Upload, specs: str | None) -> None:
    """Decoded (the body's framing checked) -> authorised (the token, as it is now) -> stored.
    A refused upload (a cap, a quota, the token changed) is discarded at once."""
    try:
        with gw.ctx.session() as session:
            fresh = queries.grant_for_id(session, grant.token_id)
            target = queries.pick_model(fresh, model_name)
            queries.register_key(
                session, fresh, target, key_id, upload.sha256, upload.size, specs, gw.settings.max_keys_per_token, _quotas(gw)
            )
            # After register_key took the blob's sweep mark away, before the commit (services.blobs).
            gw.store.adopt(upload.key, BlobKind.EVALUATION_KEY, upload.sha256)
    except BaseException:
        gw.store.discard_upload(upload.key)
        raise
    gw.auth.forget()  # this gateway's key cache; a new key set is never cached as missing elsewhere


def _model(session: Session, grant: ModelGrant) -> Model:
    model = session.get(Model, grant.model_id)
    if model is None:  # deleted since the grant was cached
        raise ModelNotFound("This model no longer exists.")
    return model


def _describe(session: Session, model: Model, warmup: bool = False) -> ClientModelOut:
    version = current_version(session, model)
    return ClientModelOut(
        id=model.id,
        name=model.name,
        status=model.status,
        version=model.version,
        concrete_ml=version.concrete_ml_version,
        concrete_python=version.concrete_python_version,
        client_zip_sha256=version.client_blob,
        running_workers=worker_service.running_count(session, model.id),
        input_shape=json.loads(version.input_shape) if version.input_shape else None,
        key_warmup=warmup,
    )
