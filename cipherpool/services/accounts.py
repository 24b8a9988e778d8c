"""Provider accounts and their API keys."""

from __future__ import annotations

from sqlmodel import Session, select

from cipherpool.credentials import API_KEY_PREFIX, DISPLAY_CHARS, digest, new_secret
from cipherpool.db.tables import Account
from cipherpool.errors import Conflict, InvalidApiKey
from cipherpool.services.validation import check_name


def create_account(session: Session, name: str) -> tuple[Account, str]:
    """A new account and its API key in clear (shown once; only its hash is kept)."""
    check_name("account", name)
    if session.exec(select(Account).where(Account.name == name)).first():
        raise Conflict(f"An account named {name!r} exists already.")
    api_key = new_secret(API_KEY_PREFIX)
    account = Account(name=name, api_key_hash=digest(api_key), api_key_prefix=api_key[:DISPLAY_CHARS])
    session.add(account)
    session.flush()
    return account, api_key


def authenticate(session: Session, api_key: str | None) -> Account:
    if not isinstance(api_key, str) or not api_key.startswith(API_KEY_PREFIX):
        raise InvalidApiKey(
            "Missing or malformed API key: pass the cpk_… key that "
            "`cipherpool admin account create` printed (or set CIPHERPOOL_API_KEY)."
        )
    account = session.exec(select(Account).where(Account.api_key_hash == digest(api_key))).first()
    if account is None:
        raise InvalidApiKey("Unknown API key.")
    return account


def get_account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise InvalidApiKey("The account behind this API key no longer exists.")
    return account
