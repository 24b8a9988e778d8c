"""Deployed models: registration, listing, activation."""

from __future__ import annotations

from sqlmodel import Session, select

from cipherpool.api.schemas import ModelOut
from cipherpool.db.tables import Account, Model, ModelStatus, utcnow
from cipherpool.errors import InvalidInput, ModelExists, ModelNotFound
from cipherpool.fhe.deployment import Versions
from cipherpool.services.validation import check_name

HARDWARE_CLASSES = ("cpu", "gpu")


def deploy_model(
    session: Session,
    account: Account,
    name: str,
    *,
    client_blob: str,
    server_blob: str,
    versions: Versions,
    hardware: str = "cpu",
) -> Model:
    check_name("model", name)
    if hardware not in HARDWARE_CLASSES:
        raise InvalidInput(f"hardware must be one of {', '.join(HARDWARE_CLASSES)}, not {hardware!r}.")
    existing = session.exec(
        select(Model).where(Model.account_id == account.id, Model.name == name)
    ).first()
    if existing:
        raise ModelExists(f"Model {name!r} exists already; deploy under another name.")
    model = Model(
        account_id=account.id,
        name=name,
        hardware=hardware,
        client_blob=client_blob,
        server_blob=server_blob,
        concrete_ml_version=versions.concrete_ml,
        concrete_python_version=versions.concrete_python,
        python_version=versions.python,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, account: Account, name: str) -> Model:
    model = session.exec(
        select(Model).where(Model.account_id == account.id, Model.name == name)
    ).first()
    if model is None:
        raise ModelNotFound(f"No model named {name!r} in this account.")
    return model


def list_models(session: Session, account: Account) -> list[Model]:
    return list(session.exec(select(Model).where(Model.account_id == account.id).order_by(Model.name)))


def set_status(session: Session, account: Account, name: str, status: ModelStatus) -> Model:
    model = get_model(session, account, name)
    model.status = status
    model.updated_at = utcnow()
    session.add(model)
    return model


def describe(model: Model) -> ModelOut:
    return ModelOut(
        id=model.id,
        name=model.name,
        status=model.status,
        hardware=model.hardware,
        concrete_ml=model.concrete_ml_version,
        concrete_python=model.concrete_python_version,
        created_at=model.created_at.isoformat(),
    )
