"""Provider endpoints for access tokens (bearer API key): create, list, show, modify,
assign, unassign, revoke, delete. Every change reaches every gateway at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from sqlmodel import Session

from cipherpool.api.schemas import ID_PATTERN, NAME_PATTERN, AssignIn, TokenCreated, TokenIn, TokenOut, TokenUpdate
from cipherpool.db.tables import AccessToken
from cipherpool.db.tables import Account as AccountRow
from cipherpool.errors import InvalidInput
from cipherpool.gateway.auth import AccountPrincipal
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.gateway.state import GatewayState
from cipherpool.services import accounts, tokens, usage

router = APIRouter(prefix="/v1/tokens", tags=["provider"])
TokenId = Annotated[str, Path(pattern=ID_PATTERN)]
ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]
ModelFilter = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.post("", response_model=TokenCreated, status_code=201)
def create_token(body: TokenIn, gw: Gateway, acct: Account) -> TokenCreated:
    """A new access token (default expiry 30 days); its value is in this answer and nowhere else."""
    names = ([body.model] if body.model else []) + body.models
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        token, value = tokens.create_token(
            session,
            account,
            body.name,
            names,
            ttl_s=body.ttl_s,
            expires_at=body.expires_at,
            no_expiry=body.no_expiry,
            quota=body.quota,
        )
        return TokenCreated(**_describe(gw, session, token).model_dump(), token=value)


@router.get("", response_model=list[TokenOut])
def list_tokens(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[TokenOut]:
    """This account's tokens, masked, with status, models, expiry, last use and queries used."""
    with gw.ctx.session() as session:
        found = tokens.list_tokens(session, accounts.get_account(session, acct.account_id), model)
        counts = usage.read(gw.store.redis, [t.id for t in found])
        return [tokens.describe(t, _names(session, t), counts[t.id]) for t in found]


@router.get("/{token_id}", response_model=TokenOut)
def show_token(token_id: TokenId, gw: Gateway, acct: Account) -> TokenOut:
    with gw.ctx.session() as session:
        return _describe(gw, session, tokens.get_token(session, accounts.get_account(session, acct.account_id), token_id))


@router.patch("/{token_id}", response_model=TokenOut)
def update_token(token_id: TokenId, body: TokenUpdate, gw: Gateway, acct: Account) -> TokenOut:
    """Change what is sent: name, expiry (``expires_at`` or ``ttl_s`` from now; ``expires_at:
    null`` for never), quota (``null``: none), enabled."""
    changes = body.model_dump(include=body.model_fields_set)
    if "ttl_s" in changes:
        if "expires_at" in changes:
            raise InvalidInput("Give expires_at or ttl_s, not both.")
        ttl = changes.pop("ttl_s")
        changes["expires_at"] = tokens.expiry(ttl_s=ttl) if ttl is not None else None
    return _change(gw, acct, lambda s, a: tokens.update_token(s, a, token_id, changes))


@router.post("/{token_id}/models", response_model=TokenOut)
def assign(token_id: TokenId, body: AssignIn, gw: Gateway, acct: Account) -> TokenOut:
    """Let the token query one more model of this account."""
    return _change(gw, acct, lambda s, a: tokens.assign(s, a, token_id, body.model))


@router.delete("/{token_id}/models/{model}", response_model=TokenOut)
def unassign(token_id: TokenId, model: ModelName, gw: Gateway, acct: Account) -> TokenOut:
    return _change(gw, acct, lambda s, a: tokens.unassign(s, a, token_id, model))


@router.post("/{token_id}/revoke", response_model=TokenOut)
def revoke_token(token_id: TokenId, gw: Gateway, acct: Account) -> TokenOut:
    """Revoke for good (a disabled token can be enabled again; a revoked one cannot)."""
    return _change(gw, acct, lambda s, a: tokens.revoke_token(s, a, token_id))


@router.delete("/{token_id}", status_code=204)
def delete_token(token_id: TokenId, gw: Gateway, acct: Account) -> Response:
    """Delete the token, its assignments and its uploaded keys (their blobs, where nothing
    else uses them, are removed by beat's key sweep after CIPHERPOOL_BLOB_SWEEP_GRACE_S)."""
    with gw.ctx.session() as session:
        tokens.delete_token(session, accounts.get_account(session, acct.account_id), token_id)
    gw.auth.changed()
    usage.forget(gw.store.redis, token_id)
    return Response(status_code=204)


def _change(gw: GatewayState, acct: AccountPrincipal, change: Callable[[Session, AccountRow], AccessToken]) -> TokenOut:
    with gw.ctx.session() as session:
        token = change(session, accounts.get_account(session, acct.account_id))
        session.flush()
        described = _describe(gw, session, token)
    gw.auth.changed()
    return described


def _describe(gw: GatewayState, session: Session, token: AccessToken) -> TokenOut:
    return tokens.describe(token, _names(session, token), usage.read(gw.store.redis, [token.id])[token.id])


def _names(session: Session, token: AccessToken) -> list[str]:
    return [m.name for m in tokens.assigned_models(session, token.id)]
