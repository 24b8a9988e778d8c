"""Authorisation of a query and the evaluation keys it may use.

Checked once, before a query is published: by the gateway (with the grant cached for a few
seconds) or by trusted in-cluster code (:mod:`cipherpool.tasks.submit`). Pool nodes trust
what reaches their queue (the broker is private to the platform) and never touch the
database on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlmodel import Session, func, select

from cipherpool.db.tables import AccessToken, EvaluationKey, Model, ModelStatus
from cipherpool.errors import (
    EvaluationKeyNotFound, InvalidEvaluationKey, InvalidToken, ModelInactive, TokenNotForModel, TooManyKeys,
)
from cipherpool.services.tokens import check_live, resolve_token

KEY_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class TokenGrant:
    """What a live token may do: query one model of one account. Small and immutable, so the
    gateway can cache it; the model's status is part of it (deactivation is seen as soon as
    the cached grant expires)."""

    token_id: str
    account_id: str
    model_id: str
    model_name: str
    model_status: ModelStatus


def _grant(token: AccessToken, model: Model) -> TokenGrant:
    return TokenGrant(token.id, token.account_id, model.id, model.name, model.status)


def grant_for_value(session: Session, value: str | None) -> TokenGrant:
    """The grant behind a clear token value (what the gateway receives as a bearer)."""
    return _grant(*resolve_token(session, value))


def grant_for_id(session: Session, token_id: str) -> TokenGrant:
    """The grant of a token named by id (what trusted in-cluster code holds)."""
    token = session.get(AccessToken, token_id) if isinstance(token_id, str) else None
    if token is None:
        raise InvalidToken(f"No access token with id {str(token_id)[:32]!r}.")
    check_live(token)
    model = session.get(Model, token.model_id)
    assert model is not None  # foreign key
    return _grant(token, model)


def check_query(grant: TokenGrant, model_id: str) -> None:
    """May this grant run a query on ``model_id`` now?"""
    if grant.model_id != model_id:
        raise TokenNotForModel("This token is not assigned to the model the ciphertext was encrypted for.")
    if grant.model_status != ModelStatus.ACTIVE:
        raise ModelInactive(
            f"Model {grant.model_name!r} is {grant.model_status.value}, not active; its provider must "
            "activate it before it accepts queries."
        )


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise InvalidEvaluationKey("A key id is 32 lowercase hex characters, as generate_keys() makes it.")
    return key_id


def check_room(session: Session, grant: TokenGrant, key_id: str, max_keys: int | None) -> EvaluationKey | None:
    """The key set's row if this token registered it already; TooManyKeys if it may not
    register another (at most ``max_keys`` key sets per token). Cheap: the gateway asks
    before it reads an upload's body."""
    check_key_id(key_id)
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == grant.token_id, EvaluationKey.key_id == key_id)
    ).first()
    if row is None and max_keys is not None:
        count = session.exec(select(func.count()).where(EvaluationKey.token_id == grant.token_id)).one()
        if count >= max_keys:
            raise TooManyKeys(f"This token has {count} key sets already (the limit); reuse one of them.")
    return row


def register_key(session: Session, grant: TokenGrant, key_id: str, blob_id: str, size_bytes: int,
                 max_keys: int | None = None) -> EvaluationKey:
    """Record that this token's client key set ``key_id`` evaluates with blob ``blob_id``;
    idempotent, and a re-upload under the same id replaces the blob."""
    row = check_room(session, grant, key_id, max_keys) or EvaluationKey(
        key_id=key_id, token_id=grant.token_id, model_id=grant.model_id, blob_id=blob_id, size_bytes=size_bytes)
    row.blob_id, row.size_bytes = blob_id, size_bytes
    session.add(row)
    session.flush()
    return row


def key_blob(session: Session, grant: TokenGrant, key_id: str) -> str:
    """The blob id of the evaluation key this grant's key set ``key_id`` uploaded."""
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == grant.token_id, EvaluationKey.key_id == key_id)
    ).first()
    if row is None or row.model_id != grant.model_id:
        raise EvaluationKeyNotFound(
            "No evaluation key with this id was uploaded with this token for this model; "
            "call upload_evaluation_keys() (CLI: `cipherpool query upload-keys`) first."
        )
    return row.blob_id
