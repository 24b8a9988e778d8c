"""The provider's own account (bearer API key): show, update details, rotate the key."""

from __future__ import annotations

from fastapi import APIRouter

from cipherpool.api.schemas import AccountOut, AccountUpdate, ApiKeyRotated
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.services import accounts

router = APIRouter(prefix="/v1/account", tags=["provider"])


@router.get("", response_model=AccountOut)
def show(gw: Gateway, acct: Account) -> AccountOut:
    with gw.ctx.session() as session:
        return accounts.describe(accounts.get_account(session, acct.account_id))


@router.patch("", response_model=AccountOut)
def update(body: AccountUpdate, gw: Gateway, acct: Account) -> AccountOut:
    """Change the fields sent (name, organisation, contact_email); ``null`` clears one."""
    with gw.ctx.session() as session:
        account = accounts.update_account(
            session, accounts.get_account(session, acct.account_id), body.model_dump(include=body.model_fields_set)
        )
        described = accounts.describe(account)
    gw.auth.changed()  # the cached principal carries the name
    return described


@router.post("/api-key", response_model=ApiKeyRotated)
def rotate_key(gw: Gateway, acct: Account) -> ApiKeyRotated:
    """A new API key, shown once; the old one stops working at once, on every gateway."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        api_key = accounts.rotate_key(session, account)
        prefix = account.api_key_prefix
    gw.auth.changed()
    return ApiKeyRotated(api_key=api_key, api_key_prefix=prefix + "…")
