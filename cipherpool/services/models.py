"""Deployed models: settings, versions, status, deletion.

A model is a name and settings; what runs is one of its numbered versions (an artifact pair
in the blob store). Deploying a new version or rolling back starts a rollout
(:mod:`cipherpool.services.rollout`); every change is written to the model's event log in the
same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, delete, func, select

from cipherpool import backends
from cipherpool.api.schemas import ModelDetail, ModelOut, VersionOut
from cipherpool.clock import utcnow
from cipherpool.db.tables import (
    Account,
    AlertEvent,
    AlertRule,
    AutoscalePolicy,
    EvaluationKey,
    Model,
    ModelStatus,
    ModelVersion,
    PoolNode,
    Schedule,
    ScheduleAction,
    TokenModel,
    Worker,
)
from cipherpool.errors import InvalidDeployment, InvalidInput, ModelBusy, ModelExists, ModelNotFound, VersionNotFound
from cipherpool.fhe.deployment import InputSpec, Versions
from cipherpool.services import blobs as blob_marks
from cipherpool.services import events, rollout
from cipherpool.services.nodes import capabilities_of
from cipherpool.services.validation import check_name
from cipherpool.statuses import HOLDING_NODE, EventKind
from cipherpool.store import BlobKind

SETTINGS = ("description", "hardware", "min_workers", "max_workers", "shared", "node_selector")
BUSY = HOLDING_NODE


@dataclass(frozen=True)
class Artifact:
    """A checked client.zip/server.zip pair, stored under its digests."""

    client_blob: str
    server_blob: str
    client_size: int
    server_size: int
    versions: Versions
    spec: InputSpec = InputSpec()
    backend: str = backends.DEFAULT_BACKEND  # what the circuit was compiled for (fhe.deployment.compiled_backend)


def check_settings(settings: dict[str, Any], current: Model | None = None) -> None:
    hardware = settings.get("hardware", current.hardware if current else backends.DEFAULT_HOST_CLASS)
    if hardware not in backends.host_classes():
        raise InvalidInput(f"hardware must be one of {', '.join(backends.host_classes())}, not {hardware!r}.")
    low = settings.get("min_workers", current.min_workers if current else 0)
    high = settings.get("max_workers", current.max_workers if current else 1)
    if low is None or high is None or low < 0 or high < 1 or low > high:
        raise InvalidInput(f"Workers: need 0 <= min_workers <= max_workers and max_workers >= 1 (got {low}..{high}).")


def model_selector(model: Model) -> dict[str, str]:
    """The labels a node must carry to serve the model ({}: any node of its class)."""
    selector = json.loads(model.node_selector or "{}")
    return {str(k): str(v) for k, v in selector.items()} if isinstance(selector, dict) else {}


def _selector_json(selector: dict[str, str] | None) -> str:
    return json.dumps(dict(sorted((selector or {}).items())), separators=(",", ":"))


def deploy_model(
    session: Session,
    account: Account,
    name: str,
    artifact: Artifact,
    *,
    hardware: str = backends.DEFAULT_HOST_CLASS,
    description: str = "",
    min_workers: int = 0,
    max_workers: int = 1,
    shared: bool = False,
    node_selector: dict[str, str] | None = None,
) -> Model:
    check_name("model", name)
    check_settings({"hardware": hardware, "min_workers": min_workers, "max_workers": max_workers})
    check_backend(name, hardware, artifact.backend)
    if session.exec(select(Model).where(Model.account_id == account.id, Model.name == name)).first():
        raise ModelExists(f"Model {name!r} exists already; deploy a new version of it, or use another name.")
    model = Model(
        account_id=account.id,
        name=name,
        hardware=hardware,
        description=description,
        min_workers=min_workers,
        max_workers=max_workers,
        shared=shared,
        version=1,
        node_selector=_selector_json(node_selector),
    )
    session.add(model)
    session.flush()
    _add_version_row(session, model, 1, artifact, note="")
    events.record(
        session,
        model,
        EventKind.DEPLOYED,
        f"deployed version 1 ({hardware}, {min_workers}..{max_workers} workers{', shared' if shared else ''})",
        version=1,
    )
    return model


def get_model(session: Session, account: Account, name: str) -> Model:
    """The account's model by name; ModelNotFound for a name of another account's too."""
    model = session.exec(select(Model).where(Model.account_id == account.id, Model.name == name)).first()
    if model is None:
        raise ModelNotFound(f"No model named {name!r} in this account.")
    return model


def list_models(session: Session, account: Account) -> list[Model]:
    return list(session.exec(select(Model).where(Model.account_id == account.id).order_by(Model.name)))


def update_settings(session: Session, account: Account, name: str, changes: dict[str, Any]) -> Model:
    """Change the settings named in ``changes``; the hardware class only while no worker runs."""
    model = get_model(session, account, name)
    unknown = set(changes) - set(SETTINGS)
    if unknown:
        raise InvalidInput(f"Unknown settings: {', '.join(sorted(unknown))}; settable: {', '.join(SETTINGS)}.")
    if changes.get("node_selector") is not None:
        changes = {**changes, "node_selector": _selector_json(changes["node_selector"])}
    changed = {k: v for k, v in changes.items() if v is not None and getattr(model, k) != v}
    if not changed:
        return model
    check_settings(changed, model)
    if "hardware" in changed and busy_workers(session, model.id):
        raise ModelBusy(f"Model {name!r} has workers on {model.hardware} nodes: stop them before changing its hardware.")
    if "hardware" in changed:
        check_serving_runs_on(session, model, changed["hardware"])
    described = ", ".join(f"{k} {getattr(model, k)!r} -> {v!r}" for k, v in changed.items())
    for key, value in changed.items():
        setattr(model, key, value)
    model.updated_at = utcnow()
    session.add(model)
    events.record(session, model, EventKind.SETTINGS_CHANGED, described)
    return model


def set_status(session: Session, account: Account, name: str, status: ModelStatus) -> Model:
    model = get_model(session, account, name)
    if model.status != status:
        model.status = status
        model.updated_at = utcnow()
        session.add(model)
        kind = EventKind.ACTIVATED if status == ModelStatus.ACTIVE else EventKind.DEACTIVATED
        events.record(session, model, kind, f"model {status.value}")
    return model


# ---- versions ----------------------------------------------------------------------------


def add_version(session: Session, account: Account, name: str, artifact: Artifact, note: str = "") -> Model:
    """Register a new version and roll it out: workers load it one at a time and keep
    answering with the serving version until every one of them holds the new one."""
    model = get_model(session, account, name)
    check_backend(model.name, model.hardware, artifact.backend)
    number = (session.exec(select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)).one() or 0) + 1
    check_holders_run(session, model, number, artifact.backend)  # before anything is written
    _add_version_row(session, model, number, artifact, note)
    events.record(
        session, model, EventKind.VERSION_ADDED, f"version {number} added" + (f": {note}" if note else ""), version=number
    )
    rollout.begin(session, model, number)
    model.updated_at = utcnow()
    session.add(model)
    return model


def rollback(session: Session, account: Account, name: str, to: int | None = None) -> Model:
    """Serve an earlier version again (default: the one before the serving one), rolled out
    the same way as a new one."""
    model = get_model(session, account, name)
    target = to if to is not None else model.version - 1
    if target == model.version and model.rollout_version is None:
        raise InvalidInput(f"Model {name!r} serves version {target} already.")
    backend = get_version(session, model, target).backend
    check_backend(model.name, model.hardware, backend)  # the model's hardware may have changed since
    check_holders_run(session, model, target, backend)
    events.record(session, model, EventKind.ROLLED_BACK, f"rollback from version {model.version} to {target}", version=target)
    rollout.begin(session, model, target)
    model.updated_at = utcnow()
    session.add(model)
    return model


def get_version(session: Session, model: Model, number: int) -> ModelVersion:
    version = session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)).first()
    if version is None:
        raise VersionNotFound(f"Model {model.name!r} has no version {number}.")
    return version


def current_version(session: Session, model: Model) -> ModelVersion:
    return get_version(session, model, model.version)


def check_backend(name: str, hardware: str, backend: str) -> None:
    """A circuit runs only on nodes of a host class its backend runs on (keys fit the backend
    it was compiled for, so no node may run it on its CPU instead)."""
    if not backends.runs_on(backend, hardware):
        raise InvalidDeployment(
            f"server.zip of model {name!r} was compiled for {backends.describe(backend).target} and the model runs on "
            f"{hardware} nodes: deploy it with --hardware {backends.describe(backend).host_class}, or compile it for "
            f"{backends.fallback().target}."
        )


def check_serving_runs_on(session: Session, model: Model, hardware: str) -> None:
    """Refuse to move a model to ``hardware`` nodes that cannot run a version it serves or rolls out."""
    stranded = sorted(b for b in required_backends(session, model) if not backends.runs_on(b, hardware))
    if stranded:
        raise InvalidInput(
            f"Model {model.name!r} serves a version compiled for {backends.describe(stranded[0]).target}, "
            f"which {hardware} nodes cannot run: deploy a version compiled for {backends.fallback().target} "
            "first."
        )


def required_backends(session: Session, model: Model) -> set[str]:
    """The backends the versions the model serves, or rolls out, were compiled for: a node
    serves it only if it has them all (its capabilities)."""
    numbers = {model.version} | ({model.rollout_version} if model.rollout_version is not None else set())
    return set(
        session.exec(
            select(ModelVersion.backend).where(ModelVersion.model_id == model.id, col(ModelVersion.number).in_(numbers))
        ).all()
    )


def check_holders_run(session: Session, model: Model, number: int, backend: str) -> None:
    """Refuse to roll a version onto workers whose nodes cannot run its backend: their loads
    would fail one by one, after the rollout began."""
    held = session.exec(
        select(Worker.id, PoolNode)
        .join(PoolNode, col(PoolNode.worker_id) == Worker.id)
        .where(Worker.model_id == model.id, col(Worker.status).in_(BUSY))
    ).all()
    stuck = [(worker, node.name) for worker, node in held if backend not in capabilities_of(node)]
    if stuck:
        names = ", ".join(f"{worker} on {node}" for worker, node in stuck)
        described = backends.describe(backend)
        raise ModelBusy(
            f"Version {number} of model {model.name!r} was compiled for {described.target} and these "
            f"workers' nodes lack {described.needs}: {names}. Stop them first."
        )


def list_versions(session: Session, model: Model) -> list[ModelVersion]:
    return list(session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(col(ModelVersion.number))))


def _add_version_row(session: Session, model: Model, number: int, artifact: Artifact, note: str) -> ModelVersion:
    row = ModelVersion(
        model_id=model.id,
        number=number,
        client_blob=artifact.client_blob,
        server_blob=artifact.server_blob,
        client_size=artifact.client_size,
        server_size=artifact.server_size,
        concrete_ml_version=artifact.versions.concrete_ml,
        concrete_python_version=artifact.versions.concrete_python,
        python_version=artifact.versions.python,
        note=note,
        input_shape=json.dumps(artifact.spec.shape) if artifact.spec.shape is not None else None,
        input_dtype=artifact.spec.dtype,
        backend=artifact.backend,
    )
    session.add(row)
    session.flush()
    # Referenced again: no sweep may remove them now (the caller adopts them into the store after this).
    blob_marks.unmark(session, BlobKind.CLIENT_ZIP, artifact.client_blob)
    blob_marks.unmark(session, BlobKind.SERVER_ZIP, artifact.server_blob)
    return row


# ---- deletion ----------------------------------------------------------------------------


def busy_workers(session: Session, model_id: str) -> list[Worker]:
    return list(session.exec(select(Worker).where(Worker.model_id == model_id, col(Worker.status).in_(BUSY))))


def delete_model(session: Session, account: Account, name: str) -> list[tuple[BlobKind, str]]:
    """Delete a model with its versions, evaluation keys, token assignments, stopped workers
    and events; refused while a worker holds a node. The blobs it referenced are marked for
    beat's key sweep, which removes those nothing references after the grace period
    (:mod:`cipherpool.services.blobs`); they are returned."""
    model = get_model(session, account, name)
    busy = busy_workers(session, model.id)
    if busy:
        raise ModelBusy(f"Model {name!r} has {len(busy)} worker(s) running: stop them first ({', '.join(w.id for w in busy)}).")
    blobs: list[tuple[BlobKind, str]] = []
    for version in list_versions(session, model):
        blobs += [(BlobKind.CLIENT_ZIP, version.client_blob), (BlobKind.SERVER_ZIP, version.server_blob)]
    keys = session.exec(select(EvaluationKey.blob_id).where(EvaluationKey.model_id == model.id)).all()
    blobs += [(BlobKind.EVALUATION_KEY, blob) for blob in keys]
    session.exec(delete(EvaluationKey).where(col(EvaluationKey.model_id) == model.id))
    session.exec(delete(TokenModel).where(col(TokenModel.model_id) == model.id))
    session.exec(delete(Worker).where(col(Worker.model_id) == model.id))
    session.exec(delete(ModelVersion).where(col(ModelVersion.model_id) == model.id))
    events.delete_events(session, model.id)
    # Its worker schedules and their actions go with it (a schedule of no model means nothing).
    schedule_ids = select(Schedule.id).where(Schedule.model_id == model.id)
    session.exec(delete(ScheduleAction).where(col(ScheduleAction.schedule_id).in_(schedule_ids)))
    session.exec(delete(Schedule).where(col(Schedule.model_id) == model.id))
    # Its alert rules and their history too (they reference the model).
    session.exec(delete(AlertEvent).where(col(AlertEvent.model_id) == model.id))
    session.exec(delete(AlertRule).where(col(AlertRule.model_id) == model.id))
    session.exec(delete(AutoscalePolicy).where(col(AutoscalePolicy.model_id) == model.id))  # its autoscaling policy
    session.delete(model)
    session.flush()
    blob_marks.mark(session, blobs)
    return sorted(set(blobs))


def unreferenced(session: Session, blobs: list[tuple[BlobKind, str]]) -> list[tuple[BlobKind, str]]:
    """Those of ``blobs`` no row references (content-addressed blobs are shared: two models,
    of any accounts, may hold the same artifact, and clients the same evaluation key; an
    expired key set references nothing)."""
    return [(kind, blob) for kind, blob in blobs if not blob_marks.referenced(session, kind, blob)]


# ---- what the API shows ------------------------------------------------------------------


def describe(session: Session, model: Model) -> ModelOut:
    version = current_version(session, model)
    return ModelOut(
        id=model.id,
        name=model.name,
        status=model.status,
        hardware=model.hardware,
        version=model.version,
        rollout_version=model.rollout_version,
        description=model.description,
        min_workers=model.min_workers,
        max_workers=model.max_workers,
        shared=model.shared,
        node_selector=model_selector(model),
        concrete_ml=version.concrete_ml_version,
        concrete_python=version.concrete_python_version,
        created_at=model.created_at.isoformat(),
        updated_at=model.updated_at.isoformat(),
    )


def describe_version(model: Model, version: ModelVersion) -> VersionOut:
    return VersionOut(
        number=version.number,
        serving=version.number == model.version,
        rolling_out=version.number == model.rollout_version,
        client_sha256=version.client_blob,
        client_size=version.client_size,
        server_sha256=version.server_blob,
        server_size=version.server_size,
        concrete_ml=version.concrete_ml_version,
        concrete_python=version.concrete_python_version,
        python=version.python_version,
        input_shape=json.loads(version.input_shape) if version.input_shape else None,
        input_dtype=version.input_dtype,
        backend=version.backend,
        note=version.note,
        created_at=version.created_at.isoformat(),
    )


def detail(session: Session, model: Model, running_workers: int) -> ModelDetail:
    versions = [describe_version(model, v) for v in list_versions(session, model)]
    serving = next(v for v in versions if v.serving)
    return ModelDetail(
        **describe(session, model).model_dump(),
        versions=versions,
        client_sha256=serving.client_sha256,
        client_size=serving.client_size,
        server_sha256=serving.server_sha256,
        server_size=serving.server_size,
        input_shape=serving.input_shape,
        input_dtype=serving.input_dtype,
        running_workers=running_workers,
    )
