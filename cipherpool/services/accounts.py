"""Provider accounts and their API keys.

An operator (where the database is) creates, lists, disables and enables accounts; a provider
shows and updates its own details and rotates its key. A disabled account is kept whole
(nothing is deleted): its key and tokens are refused and its workers stopped, until enabled.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlmodel import Session, col, select

from cipherpool.api.schemas import AccountOut
from cipherpool.clock import utcnow
from cipherpool.config.settings import get_settings
from cipherpool.credentials import API_KEY_PREFIX, DISPLAY_CHARS, digest, new_secret
from cipherpool.db.tables import Account
from cipherpool.errors import AccountDisabled, AccountNotFound, Conflict, InvalidApiKey, InvalidInput
from cipherpool.services.validation import check_name
from cipherpool.statuses import AccountStatus

EDITABLE = ("name", "organisation", "contact_email")


def create_account(
    session: Session,
    name: str,
    *,
    organisation: str | None = None,
    contact_email: str | None = None,
    signup_grant: Decimal | None = None,
) -> tuple[Account, str]:
    """A new account and its API key in clear (shown once; only its hash is kept), with the
    sign-up grant of credits (``credits_signup_grant`` unless given) as its first ledger line.

    Only an operator creates accounts, so a refused duplicate name tells nobody anything new."""
    check_name("account", name)
    if session.exec(select(Account).where(Account.name == name)).first():
        raise Conflict(f"An account named {name!r} exists already.")
    api_key = new_secret(API_KEY_PREFIX)
    account = Account(
        name=name,
        organisation=organisation,
        contact_email=contact_email,
        api_key_hash=digest(api_key),
        api_key_prefix=api_key[:DISPLAY_CHARS],
    )
    session.add(account)
    session.flush()
    grant = get_settings().credits_signup_grant if signup_grant is None else signup_grant
    if grant > 0:
        from cipherpool.billing.payments import grant as add_grant

        add_grant(session, account.id, grant, note="sign-up grant", key="signup")
    return account, api_key


def authenticate(session: Session, api_key: str | None) -> Account:
    if not isinstance(api_key, str) or not api_key.startswith(API_KEY_PREFIX):
        raise InvalidApiKey(
            "Missing or malformed API key: pass the cpk_… key that "
            "`cipherpool admin account create` printed (or set CIPHERPOOL_API_KEY)."
        )
    return authenticate_hash(session, digest(api_key))


def authenticate_hash(session: Session, api_key_hash: str) -> Account:
    """:func:`authenticate` by the key's digest (a cache reloads by it, holding no clear key)."""
    account = session.exec(select(Account).where(Account.api_key_hash == api_key_hash)).first()
    if account is None:
        raise InvalidApiKey("Unknown API key (a rotated key stops working at once).")
    check_enabled(account)
    return account


def check_enabled(account: Account) -> None:
    if account.disabled_at is not None:
        raise AccountDisabled("This account is disabled; its operator can enable it again.")


def get_account(session: Session, account_id: str) -> Account:
    """The (enabled) account of an authenticated provider."""
    account = session.get(Account, account_id)
    if account is None:
        raise InvalidApiKey("The account behind this API key no longer exists.")
    check_enabled(account)
    return account


def update_account(session: Session, account: Account, changes: dict[str, Any]) -> Account:
    """Change the fields named in ``changes`` (name, organisation, contact_email)."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise InvalidInput(f"Cannot change {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}.")
    if "name" in changes:
        if changes["name"] is None:
            raise InvalidInput("An account needs a name.")
        check_name("account", changes["name"])
    for field, value in changes.items():
        setattr(account, field, value)
    account.updated_at = utcnow()
    session.add(account)
    return account


def rotate_key(session: Session, account: Account) -> str:
    """A new API key for the account; the old one stops at once. Returns the new one, in clear."""
    api_key = new_secret(API_KEY_PREFIX)
    account.api_key_hash, account.api_key_prefix = digest(api_key), api_key[:DISPLAY_CHARS]
    account.updated_at = utcnow()
    session.add(account)
    session.flush()
    return api_key


# ---- operator ------------------------------------------------------------------------------


def list_accounts(session: Session) -> list[Account]:
    return list(session.exec(select(Account).order_by(col(Account.created_at))))


def find_account(session: Session, id_or_name: str) -> Account:
    """An account by id, or by name when exactly one has it (an operator's lookup)."""
    account = session.get(Account, id_or_name)
    if account is not None:
        return account
    named = list(session.exec(select(Account).where(Account.name == id_or_name)))
    if len(named) > 1:
        raise Conflict(f"{len(named)} accounts are named {id_or_name!r}; name one by id: " + ", ".join(a.id for a in named))
    if not named:
        raise AccountNotFound(f"No account with id or name {id_or_name!r}.")
    return named[0]


def set_disabled(session: Session, account: Account, disabled: bool) -> Account:
    account.disabled_at = (account.disabled_at or utcnow()) if disabled else None
    account.updated_at = utcnow()
    session.add(account)
    return account


def describe(account: Account) -> AccountOut:
    return AccountOut(
        id=account.id,
        name=account.name,
        organisation=account.organisation,
        contact_email=account.contact_email,
        status=AccountStatus.DISABLED if account.disabled_at else AccountStatus.ACTIVE,
        api_key_prefix=account.api_key_prefix + "…",
        created_at=account.created_at.isoformat(),
        updated_at=account.updated_at.isoformat() if account.updated_at else None,
    )
