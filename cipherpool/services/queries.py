"""Authorisation of a query and the evaluation keys it may use.

Runs on the pool node for every query, so it is two indexed lookups and nothing more.
"""

from __future__ import annotations

import re

from sqlmodel import Session, select

from cipherpool.db.tables import AccessToken, EvaluationKey, Model, ModelStatus
from cipherpool.errors import EvaluationKeyNotFound, InvalidEvaluationKey, ModelInactive, TokenNotForModel
from cipherpool.services.tokens import resolve_token

KEY_ID = re.compile(r"[0-9a-f]{32}")


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


def register_key(session: Session, token: AccessToken, key_id: str, blob_id: str, size_bytes: int) -> EvaluationKey:
    """Record that this token's client key set ``key_id`` evaluates with blob ``blob_id``;
    idempotent, and a re-upload under the same id replaces the blob."""
    if not KEY_ID.fullmatch(key_id):
        raise InvalidEvaluationKey("A key id is 32 lowercase hex characters, as generate_keys() makes it.")
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == token.id, EvaluationKey.key_id == key_id)
    ).first()
    if row is None:
        row = EvaluationKey(key_id=key_id, token_id=token.id, model_id=token.model_id, blob_id=blob_id, size_bytes=size_bytes)
    row.blob_id, row.size_bytes = blob_id, size_bytes
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
