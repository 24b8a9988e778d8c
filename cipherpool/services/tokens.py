"""Access tokens: what an end user holds to query the models its token is assigned to.

A token belongs to one account and may be assigned to several of its models. It stops
working when revoked (for good), disabled (until enabled), expired, or at its query quota;
each refusal names which. Only the SHA-256 of its value is stored.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, delete, select

from cipherpool.api.schemas import DEFAULT_TOKEN_TTL_S, TokenOut
from cipherpool.clock import aware, utcnow
from cipherpool.credentials import DISPLAY_CHARS, TOKEN_PREFIX, digest, new_secret
from cipherpool.db.tables import AccessToken, Account, EvaluationKey, Model, TokenModel
from cipherpool.errors import (
    InvalidInput,
    InvalidToken,
    TokenDisabled,
    TokenExpired,
    TokenNotFound,
    TokenRevoked,
)
from cipherpool.services import blobs as blob_marks
from cipherpool.services import events
from cipherpool.services.accounts import check_enabled
from cipherpool.services.models import get_model
from cipherpool.services.usage import Usage, exhausted
from cipherpool.services.validation import check_name
from cipherpool.statuses import EventKind, TokenStatus
from cipherpool.store import BlobKind

EDITABLE = ("name", "expires_at", "quota", "enabled")


def expiry(
    ttl_s: float | None = None, expires_at: datetime | None = None, no_expiry: bool = False, now: datetime | None = None
) -> datetime | None:
    """When a new token expires: ``expires_at``, else ``ttl_s`` from now, else in 30 days;
    never with ``no_expiry``."""
    if sum(x is not None and x is not False for x in (ttl_s, expires_at, no_expiry or None)) > 1:
        raise InvalidInput("Give at most one of ttl_s, expires_at and no_expiry.")
    now = now or utcnow()
    if no_expiry:
        return None
    if expires_at is not None:
        expires_at = aware(expires_at)
        if expires_at <= now:
            raise InvalidInput("expires_at is in the past.")
        return expires_at
    if ttl_s is not None and ttl_s <= 0:
        raise InvalidInput("A token's time to live must be positive.")
    return now + timedelta(seconds=ttl_s if ttl_s is not None else DEFAULT_TOKEN_TTL_S)


def create_token(
    session: Session,
    account: Account,
    name: str,
    models: str | list[str] | None = None,
    *,
    ttl_s: float | None = None,
    expires_at: datetime | None = None,
    no_expiry: bool = False,
    quota: int | None = None,
) -> tuple[AccessToken, str]:
    """A token assigned to ``models`` (a name, names, or none yet) that expires as
    :func:`expiry` says; the clear value is returned once."""
    check_name("token", name)
    _check_quota(quota)
    expires_at = expiry(ttl_s, expires_at, no_expiry)
    names = [models] if isinstance(models, str) else list(models or [])
    targets = [get_model(session, account, m) for m in dict.fromkeys(names)]
    value = new_secret(TOKEN_PREFIX)
    token = AccessToken(
        account_id=account.id,
        name=name,
        token_hash=digest(value),
        prefix=value[:DISPLAY_CHARS],
        expires_at=expires_at,
        quota=quota,
    )
    session.add(token)
    session.flush()
    for model in targets:
        _assign(session, token, model)
    return token, value


def get_token(session: Session, account: Account, token_id: str) -> AccessToken:
    token = session.get(AccessToken, token_id)
    if token is None or token.account_id != account.id:
        raise TokenNotFound(f"No token {token_id!r} in this account.")
    return token


def assigned_models(session: Session, token_id: str) -> list[Model]:
    return list(
        session.exec(
            select(Model)
            .join(TokenModel, col(TokenModel.model_id) == Model.id)
            .where(TokenModel.token_id == token_id)
            .order_by(col(Model.name))
        )
    )


def update_token(session: Session, account: Account, token_id: str, changes: dict[str, Any]) -> AccessToken:
    """Change name, expiry (``None``: never), quota (``None``: none) or enabled."""
    token = get_token(session, account, token_id)
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise InvalidInput(f"Cannot change {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}.")
    if token.revoked_at is not None:
        raise InvalidInput("This token is revoked for good; create a new one.")
    if "name" in changes:
        check_name("token", changes["name"])
        token.name = changes["name"]
    if "expires_at" in changes:
        token.expires_at = aware(changes["expires_at"]) if changes["expires_at"] is not None else None
    if "quota" in changes:
        _check_quota(changes["quota"])
        token.quota = changes["quota"]
    if "enabled" in changes:
        token.disabled_at = None if changes["enabled"] else (token.disabled_at or utcnow())
    token.updated_at = utcnow()
    session.add(token)
    return token


def assign(session: Session, account: Account, token_id: str, model_name: str) -> AccessToken:
    token = get_token(session, account, token_id)
    model = get_model(session, account, model_name)
    if session.get(TokenModel, (token.id, model.id)) is None:
        _assign(session, token, model)
        token.updated_at = utcnow()
        session.add(token)
    return token


def unassign(session: Session, account: Account, token_id: str, model_name: str) -> AccessToken:
    token = get_token(session, account, token_id)
    model = get_model(session, account, model_name)
    link = session.get(TokenModel, (token.id, model.id))
    if link is not None:
        session.delete(link)
        events.record(
            session, model, EventKind.TOKEN_UNASSIGNED, f"token {token.name} ({token.id}) unassigned", token_id=token.id
        )
        token.updated_at = utcnow()
        session.add(token)
    return token


def revoke_token(session: Session, account: Account, token_id: str) -> AccessToken:
    token = get_token(session, account, token_id)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
    return token


def delete_token(session: Session, account: Account, token_id: str) -> list[tuple[BlobKind, str]]:
    """Delete a token with its assignments and key sets; the evaluation-key blobs it
    referenced are marked for beat's key sweep (which removes those nothing else references,
    after the grace period: :mod:`cipherpool.services.blobs`), and returned."""
    token = get_token(session, account, token_id)
    blobs = [
        (BlobKind.EVALUATION_KEY, b)
        for b in session.exec(select(EvaluationKey.blob_id).where(EvaluationKey.token_id == token.id)).all()
    ]
    for model in assigned_models(session, token.id):
        events.record(session, model, EventKind.TOKEN_UNASSIGNED, f"token {token.name} ({token.id}) deleted", token_id=token.id)
    session.exec(delete(EvaluationKey).where(col(EvaluationKey.token_id) == token.id))
    session.exec(delete(TokenModel).where(col(TokenModel.token_id) == token.id))
    session.delete(token)
    session.flush()
    blob_marks.mark(session, blobs)
    return sorted(set(blobs))


def list_tokens(session: Session, account: Account, model_name: str | None = None) -> list[AccessToken]:
    query = select(AccessToken).where(AccessToken.account_id == account.id)
    if model_name is not None:
        model = get_model(session, account, model_name)
        query = query.join(TokenModel, col(TokenModel.token_id) == AccessToken.id).where(TokenModel.model_id == model.id)
    return list(session.exec(query.order_by(col(AccessToken.created_at))))


def resolve_token(session: Session, value: str | None, now: datetime | None = None) -> AccessToken:
    """The live token behind a clear value; a typed refusal naming why otherwise."""
    if not isinstance(value, str) or not value.startswith(TOKEN_PREFIX):
        raise InvalidToken("Missing or malformed access token: pass the cpt_… value you were given.")
    return resolve_token_hash(session, digest(value), now)


def resolve_token_hash(session: Session, token_hash: str, now: datetime | None = None) -> AccessToken:
    """:func:`resolve_token` by the value's digest: what a cache that must not hold the clear
    value (the gateway's, which reloads a credential in the background) looks up again."""
    token = session.exec(select(AccessToken).where(AccessToken.token_hash == token_hash)).first()
    if token is None:
        raise InvalidToken("Unknown access token.")
    check_usable(session, token, now)
    return token


def check_usable(session: Session, token: AccessToken, now: datetime | None = None) -> None:
    """The token and its provider's account may be used now (quota apart: counted per query)."""
    check_live(token, now)
    account = session.get(Account, token.account_id)
    assert account is not None  # foreign key
    check_enabled(account)


def check_live(token: AccessToken, now: datetime | None = None) -> None:
    if token.revoked_at is not None:
        raise TokenRevoked("This access token was revoked; ask the model's provider for a new one.")
    if token.disabled_at is not None:
        raise TokenDisabled("This access token is disabled by its provider; ask them to enable it.")
    if token.expires_at is not None and aware(token.expires_at) <= (now or utcnow()):
        raise TokenExpired("This access token has expired; ask the model's provider to extend it or for a new one.")


def status(token: AccessToken, usage: Usage, now: datetime | None = None) -> TokenStatus:
    if token.revoked_at is not None:
        return TokenStatus.REVOKED
    if token.disabled_at is not None:
        return TokenStatus.DISABLED
    if token.expires_at is not None and aware(token.expires_at) <= (now or utcnow()):
        return TokenStatus.EXPIRED
    if exhausted(usage, token.quota):
        return TokenStatus.EXHAUSTED
    return TokenStatus.ACTIVE


def describe(token: AccessToken, model_names: list[str], usage: Usage) -> TokenOut:
    return TokenOut(
        id=token.id,
        name=token.name,
        model=model_names[0] if len(model_names) == 1 else None,
        models=model_names,
        prefix=token.prefix,
        masked=token.prefix + "…" + "*" * 8,
        status=status(token, usage),
        created_at=token.created_at.isoformat(),
        updated_at=_iso(token.updated_at),
        expires_at=_iso(token.expires_at),
        revoked=token.revoked_at is not None,
        quota=token.quota,
        queries_used=usage.queries,
        last_used_at=_iso(usage.last_used_at),
    )


def _iso(moment: datetime | None) -> str | None:
    return aware(moment).isoformat() if moment is not None else None


def _assign(session: Session, token: AccessToken, model: Model) -> None:
    session.add(TokenModel(token_id=token.id, model_id=model.id))
    events.record(session, model, EventKind.TOKEN_ASSIGNED, f"token {token.name} ({token.id}) assigned", token_id=token.id)


def _check_quota(quota: int | None) -> None:
    if quota is not None and (not isinstance(quota, int) or quota < 0):
        raise InvalidInput("A quota is a number of queries, 0 or more.")
