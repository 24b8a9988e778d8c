"""Key sets with a lifecycle: what they may take of the store, how long they live, and what
their owner sees of them.

* **Quotas.** The bytes of a token's live key sets, and of all its account's tokens' key
  sets, are bounded (``max_key_bytes_per_token``, ``max_key_bytes_per_account``): a key set
  that would pass one is refused with the typed error naming it (409). Each key set counts
  its whole size, even where two share one content-addressed blob.
* **Expiry.** A key set unused (no query, no warm-up) for ``key_idle_expiry_s`` expires, and
  so does every key set of a token that expired or was revoked: its row stays, marked
  expired (a query with it gets ``evaluation_key_expired``, naming the model and its serving
  version, and a QueryClient uploads it again by itself), and its blob is marked for the
  sweep (:mod:`cipherpool.services.blobs`). An expired row is deleted one more idle period
  later. Last uses come from Redis (:mod:`cipherpool.services.keyuse`), flushed by beat.
* **Listing and deleting** by the end user, through its own token only: another token's key
  set answers exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, func, or_, text, update
from sqlmodel import Session, col, select

from cipherpool.api.schemas import KeySetOut
from cipherpool.clock import aware, utcnow
from cipherpool.db.tables import AccessToken, EvaluationKey, Model, ModelVersion
from cipherpool.errors import AccountKeyQuotaExceeded, EvaluationKeyNotFound, TokenKeyQuotaExceeded
from cipherpool.services import blobs
from cipherpool.services.keyuse import Uses
from cipherpool.statuses import KeySetStatus
from cipherpool.store import BlobKind

GIB, MIB = 1024**3, 1024**2


@dataclass(frozen=True)
class KeyQuotas:
    """Bytes of live key sets allowed per token and per account (0: no quota)."""

    per_token: int = 0
    per_account: int = 0


LIVE = col(EvaluationKey.expired_at).is_(None)  # a key set that did not expire


def stored_bytes(
    session: Session, *, token_id: str | None = None, account_id: str | None = None, besides: tuple[str, str] | None = None
) -> int:
    """Bytes of the live key sets of a token, or of an account's tokens; ``besides``: leave out
    key set (token id, key id), the one being replaced."""
    query = select(func.coalesce(func.sum(EvaluationKey.size_bytes), 0)).where(LIVE)
    if token_id is not None:
        query = query.where(EvaluationKey.token_id == token_id)
    if account_id is not None:
        query = query.join(AccessToken, col(AccessToken.id) == EvaluationKey.token_id).where(AccessToken.account_id == account_id)
    if besides is not None:
        query = query.where(~((col(EvaluationKey.token_id) == besides[0]) & (col(EvaluationKey.key_id) == besides[1])))
    return int(session.exec(query).one())


def lock_account_keys(session: Session, account_id: str) -> None:
    """Serialise key-set registrations of one account until the transaction ends, so that two
    uploads at once cannot pass a quota together: a transaction-scoped advisory lock on
    PostgreSQL (no row is locked: billing may update the account meanwhile); nothing on SQLite,
    whose writers take turns (the caller checks the quota after its row is written)."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"keys:{account_id}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def check_quota(session: Session, token_id: str, account_id: str, key_id: str, size: int, quotas: KeyQuotas) -> None:
    """May key set ``key_id`` of this token hold ``size`` bytes (replacing what it held)? The
    typed refusal naming the quota otherwise. The account's figure is not told: it sums other
    end users' key sets."""
    if quotas.per_token:
        others = stored_bytes(session, token_id=token_id, besides=(token_id, key_id))
        if others + size > quotas.per_token:
            raise TokenKeyQuotaExceeded(
                f"This key set ({_bytes(size)}) would take this token's stored key sets to {_bytes(others + size)}, "
                f"over its quota of {_bytes(quotas.per_token)} (CIPHERPOOL_MAX_KEY_BYTES_PER_TOKEN): delete key sets "
                "it no longer uses (`cipherpool query keys delete`), or ask the model's provider."
            )
    if quotas.per_account:
        others = stored_bytes(session, account_id=account_id, besides=(token_id, key_id))
        if others + size > quotas.per_account:
            raise AccountKeyQuotaExceeded(
                f"The provider's account is at its quota of stored key sets ({_bytes(quotas.per_account)}, "
                "CIPHERPOOL_MAX_KEY_BYTES_PER_ACCOUNT): delete key sets no longer used, or ask the model's provider."
            )


def made_for(session: Session, model_id: str, client_blob: str) -> int | None:
    """The newest version of the model whose client specs are ``client_blob`` (what a key set
    made from them was made for); None if no version has them any more."""
    if not client_blob:
        return None
    number = session.exec(
        select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model_id, ModelVersion.client_blob == client_blob)
    ).one()
    return int(number) if number is not None else None


# ---- the end user's view ---------------------------------------------------------------


def key_ids(session: Session, token_id: str) -> list[str]:
    return list(session.exec(select(EvaluationKey.key_id).where(EvaluationKey.token_id == token_id)).all())


def list_key_sets(session: Session, token_id: str, uses: dict[str, float], idle_s: float) -> list[KeySetOut]:
    """This token's key sets, oldest first. ``uses``: last uses not flushed yet (key id -> unix
    time), newer than the rows'."""
    rows = session.exec(
        select(EvaluationKey, Model)
        .join(Model, col(Model.id) == EvaluationKey.model_id)
        .where(EvaluationKey.token_id == token_id)
        .order_by(col(EvaluationKey.created_at))
    ).all()
    serving = (
        dict(
            session.exec(
                select(ModelVersion.model_id, ModelVersion.client_blob)
                .join(Model, (col(Model.id) == ModelVersion.model_id) & (col(Model.version) == ModelVersion.number))
                .where(col(Model.id).in_({m.id for _, m in rows}))
            ).all()
        )
        if rows
        else {}
    )
    return [_describe(session, row, model, serving.get(model.id, ""), uses.get(row.key_id), idle_s) for row, model in rows]


def _describe(
    session: Session, row: EvaluationKey, model: Model, serving_blob: str, pending_use: float | None, idle_s: float
) -> KeySetOut:
    last = aware(row.last_used_at) if row.last_used_at is not None else None
    if pending_use is not None:
        recorded = datetime.fromtimestamp(pending_use, UTC)
        last = max(last, recorded) if last is not None else recorded
    if row.expired_at is not None:
        status, expires = KeySetStatus.EXPIRED, None
    else:
        status = KeySetStatus.ACTIVE if row.client_blob == serving_blob else KeySetStatus.OUTDATED
        start = last or aware(row.created_at)
        expires = start + timedelta(seconds=idle_s) if idle_s else None
    return KeySetOut(
        key_id=row.key_id,
        model=model.name,
        made_for_version=made_for(session, model.id, row.client_blob),
        serving_version=model.version,
        status=status,
        size_bytes=row.size_bytes,
        blob_id=row.blob_id,
        created_at=aware(row.created_at).isoformat(),
        last_used_at=last.isoformat() if last else None,
        expires_at=expires.isoformat() if expires else None,
        expired_at=aware(row.expired_at).isoformat() if row.expired_at is not None else None,
    )


def delete_key_set(session: Session, token_id: str, key_id: str, now: datetime | None = None) -> None:
    """Delete this token's key set ``key_id`` (expired or not); its blob is marked for the
    sweep. Another token's key set is not found, exactly like one that does not exist."""
    row = session.exec(select(EvaluationKey).where(EvaluationKey.token_id == token_id, EvaluationKey.key_id == key_id)).first()
    if row is None:
        raise EvaluationKeyNotFound(f"No key set {key_id} for this access token.")
    if row.expired_at is None:
        blobs.mark(session, [(BlobKind.EVALUATION_KEY, row.blob_id)], now)
    session.delete(row)
    session.flush()


# ---- expiry, by beat's key sweep ---------------------------------------------------------


def apply_uses(session: Session, uses: Uses) -> int:
    """Write last uses recorded in Redis into the rows (never moving one back); how many."""
    if not uses:
        return 0
    table = EvaluationKey.__table__  # type: ignore[attr-defined]
    statement = (
        update(table)
        .where(
            table.c.token_id == bindparam("token"),
            table.c.key_id == bindparam("key"),
            or_(table.c.last_used_at.is_(None), table.c.last_used_at < bindparam("at")),
        )
        .values(last_used_at=bindparam("at"))
    )
    params = [
        {"token": token_id, "key": key_id, "at": datetime.fromtimestamp(at, UTC)} for (token_id, key_id), at in uses.items()
    ]
    session.connection().execute(statement, params)
    return len(params)


def expire(session: Session, rows: list[EvaluationKey], now: datetime) -> int:
    """Expire these live key sets: rows kept as expired, blobs marked for the sweep."""
    for row in rows:
        row.expired_at = now
        session.add(row)
    blobs.mark(session, [(BlobKind.EVALUATION_KEY, row.blob_id) for row in rows], now)
    session.flush()
    return len(rows)


def expire_idle(session: Session, idle_s: float, now: datetime | None = None) -> int:
    """Expire the live key sets unused for ``idle_s`` (never used: since they were uploaded)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=idle_s)
    rows = session.exec(
        select(EvaluationKey).where(LIVE, func.coalesce(EvaluationKey.last_used_at, EvaluationKey.created_at) <= cutoff)
    ).all()
    return expire(session, list(rows), now)


def expire_of_dead_tokens(session: Session, now: datetime | None = None) -> int:
    """Expire the live key sets of tokens that expired or were revoked (not of disabled ones:
    those may be enabled again)."""
    now = now or utcnow()
    dead = select(AccessToken.id).where(or_(col(AccessToken.revoked_at).is_not(None), col(AccessToken.expires_at) <= now))
    rows = session.exec(select(EvaluationKey).where(LIVE, col(EvaluationKey.token_id).in_(dead))).all()
    return expire(session, list(rows), now)


def purge_expired(session: Session, before: datetime) -> int:
    """Delete the rows of key sets expired before ``before`` (their blobs were marked then)."""
    rows = session.exec(select(EvaluationKey).where(col(EvaluationKey.expired_at) < before)).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def _bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
