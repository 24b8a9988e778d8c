"""Access tokens: what an end user holds to query one model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from cipherpool.api.schemas import TokenOut
from cipherpool.credentials import DISPLAY_CHARS, TOKEN_PREFIX, digest, new_secret
from cipherpool.db.tables import AccessToken, Account, Model, utcnow
from cipherpool.errors import InvalidInput, InvalidToken, TokenNotFound
from cipherpool.services.models import get_model
from cipherpool.services.validation import check_name


def create_token(
    session: Session, account: Account, name: str, model_name: str, ttl_s: float | None = None
) -> tuple[AccessToken, str]:
    """A token for one model of the account; the clear value is returned once, never stored."""
    check_name("token", name)
    if ttl_s is not None and ttl_s <= 0:
        raise InvalidInput("A token's time to live must be positive.")
    model = get_model(session, account, model_name)
    value = new_secret(TOKEN_PREFIX)
    token = AccessToken(
        account_id=account.id,
        model_id=model.id,
        name=name,
        token_hash=digest(value),
        prefix=value[:DISPLAY_CHARS],
        expires_at=utcnow() + timedelta(seconds=ttl_s) if ttl_s else None,
    )
    session.add(token)
    session.flush()
    return token, value


def revoke_token(session: Session, account: Account, token_id: str) -> AccessToken:
    token = session.get(AccessToken, token_id)
    if token is None or token.account_id != account.id:
        raise TokenNotFound(f"No token {token_id!r} in this account.")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
    return token


def list_tokens(session: Session, account: Account) -> list[AccessToken]:
    return list(
        session.exec(select(AccessToken).where(AccessToken.account_id == account.id).order_by(col(AccessToken.created_at)))
    )


def resolve_token(session: Session, value: str | None, now: datetime | None = None) -> tuple[AccessToken, Model]:
    """The live token behind a clear value and its model; InvalidToken otherwise."""
    if not isinstance(value, str) or not value.startswith(TOKEN_PREFIX):
        raise InvalidToken("Missing or malformed access token: pass the cpt_… value you were given.")
    token = session.exec(select(AccessToken).where(AccessToken.token_hash == digest(value))).first()
    if token is None:
        raise InvalidToken("Unknown access token.")
    check_live(token, now)
    model = session.get(Model, token.model_id)
    assert model is not None  # foreign key
    return token, model


def check_live(token: AccessToken, now: datetime | None = None) -> None:
    if token.revoked_at is not None:
        raise InvalidToken("This access token was revoked; ask the model's provider for a new one.")
    expires = token.expires_at
    if expires is not None and expires.tzinfo is None:  # SQLite hands datetimes back naive (UTC)
        expires = expires.replace(tzinfo=UTC)
    if expires is not None and expires <= (now or utcnow()):
        raise InvalidToken("This access token has expired; ask the model's provider for a new one.")


def describe(token: AccessToken, model_name: str) -> TokenOut:
    return TokenOut(
        id=token.id,
        name=token.name,
        model=model_name,
        prefix=token.prefix,
        created_at=token.created_at.isoformat(),
        expires_at=token.expires_at.isoformat() if token.expires_at else None,
        revoked=token.revoked_at is not None,
    )
