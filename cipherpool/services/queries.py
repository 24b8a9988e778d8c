"""Authorisation of a query and the evaluation keys it may use.

Runs on the pool node for every query, so it is two indexed lookups and nothing more.
"""

from __future__ import annotations

from sqlmodel import Session, select

from cipherpool.db.tables import AccessToken, EvaluationKey, Model, ModelStatus
from cipherpool.errors import EvaluationKeyNotFound, ModelInactive, TokenNotForModel
from cipherpool.services.tokens import resolve_token


def authorize_query(session: Session, token_value: str, model_id: str) -> tuple[AccessToken, Model]:
    token, model = resolve_token(session, token_value)
    if model.id != model_id:
        raise TokenNotForModel("This token is not assigned to the model the query was sent to.")
    if model.status != ModelStatus.ACTIVE:
        raise ModelInactive(
            f"Model {model.name!r} is {model.status.value}, not active; its provider must "
            "activate it before it accepts queries."
        )
    return token, model


def register_key(session: Session, token: AccessToken, key_id: str, size_bytes: int) -> EvaluationKey:
    """Allow this token's client to use an uploaded key; idempotent."""
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == token.id, EvaluationKey.key_id == key_id)
    ).first()
    if row is None:
        row = EvaluationKey(key_id=key_id, token_id=token.id, model_id=token.model_id, size_bytes=size_bytes)
        session.add(row)
        session.flush()
    return row


def require_key(session: Session, token: AccessToken, key_id: str) -> EvaluationKey:
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == token.id, EvaluationKey.key_id == key_id)
    ).first()
    if row is None or row.model_id != token.model_id:
        raise EvaluationKeyNotFound(
            "No evaluation key with this id was uploaded with this token for this model; "
            "call upload_evaluation_keys() (CLI: `cipherpool query upload-keys`) first."
        )
    return row
