"""Blobs that rows stopped referencing, and when they may leave the store.

Blobs are content-addressed and shared: two models (of any accounts) may hold the same
artifact, and clients of a model without bootstrapping upload the very same evaluation key. So
a row that stops referencing a blob (a key set replaced, deleted or expired; a model deleted)
does not delete it: it *marks* it (:func:`mark`), in its own transaction, and beat's key sweep
(:mod:`cipherpool.scheduler.keys`) removes a blob marked at least ``blob_sweep_grace_s`` ago
that nothing references then (:func:`claim`). An upload or a deploy that adopts the blob
deletes its mark (:func:`unmark`) in its transaction, *before* it writes the blob into the
store.

Why no referenced blob is removed, however the two interleave:

* :func:`claim` deletes the mark first, so it holds the mark's row lock (PostgreSQL) or the
  database's write lock (SQLite) until it commits, and the sweep removes the blob from the
  store before that commit.
* :func:`unmark` deletes the same row, so it waits for a claim in progress; the adopter writes
  the blob only after unmark returned. Either the sweep removed the blob first (and the
  adopter writes it again), or the sweep finds no mark (and leaves it alone).
* A mark made while an adopter's transaction runs (another key set with the same blob deleted
  meanwhile) is claimed only after the grace period, when the adopter's row is committed and
  counts as a reference. The grace period also covers a query queued with a blob id just
  before its row went, and a gateway's cached key lookup (``auth_cache_ttl_s``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, delete, func, select

from cipherpool.clock import utcnow
from cipherpool.db.tables import BlobCandidate, EvaluationKey, ModelVersion
from cipherpool.store import BlobKind

SWEEP_BATCH = 500  # marks looked at per sweep, oldest first


def mark(session: Session, blobs: Iterable[tuple[BlobKind, str]], now: datetime | None = None) -> None:
    """These blobs may no longer be referenced: candidates for the sweep from ``now`` (a blob
    marked again starts its grace period again)."""
    rows = [{"kind": kind.value, "blob_id": blob_id, "marked_at": now or utcnow()} for kind, blob_id in set(blobs)]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(BlobCandidate).values(rows)
    session.execute(
        statement.on_conflict_do_update(index_elements=["kind", "blob_id"], set_={"marked_at": statement.excluded.marked_at})
    )


def unmark(session: Session, kind: BlobKind, blob_id: str) -> None:
    """A row references the blob (again): no sweep may remove it. Call it before writing the
    blob into the store; it waits for a sweep that is removing it (see the module's docstring)."""
    session.exec(delete(BlobCandidate).where(col(BlobCandidate.kind) == kind.value, col(BlobCandidate.blob_id) == blob_id))


def referenced(session: Session, kind: BlobKind, blob_id: str) -> bool:
    """Whether a row references the blob: a live key set (an expired one does not), or a
    model version."""
    if kind == BlobKind.EVALUATION_KEY:
        query = select(EvaluationKey.id).where(EvaluationKey.blob_id == blob_id, col(EvaluationKey.expired_at).is_(None))
        return session.exec(query.limit(1)).first() is not None
    column = ModelVersion.client_blob if kind == BlobKind.CLIENT_ZIP else ModelVersion.server_blob
    return session.exec(select(ModelVersion.id).where(column == blob_id).limit(1)).first() is not None


def due(session: Session, cutoff: datetime, limit: int = SWEEP_BATCH) -> list[tuple[BlobKind, str]]:
    """Marks made at or before ``cutoff``, oldest first."""
    rows = session.exec(
        select(BlobCandidate.kind, BlobCandidate.blob_id)
        .where(BlobCandidate.marked_at <= cutoff)
        .order_by(col(BlobCandidate.marked_at))
        .limit(limit)
    ).all()
    return [(BlobKind(kind), blob_id) for kind, blob_id in rows]


def claim(session: Session, kind: BlobKind, blob_id: str, cutoff: datetime) -> bool:
    """Take the blob's mark if it was made at or before ``cutoff``; True if nothing references
    the blob: the caller removes it from the store, then commits (a failed removal rolls the
    claim back, and the next sweep tries again). False: someone unmarked or marked it again
    meanwhile, or a row references it (the mark is gone; the blob stays)."""
    taken = session.exec(
        delete(BlobCandidate).where(  # first: it locks the mark (see the module's docstring)
            col(BlobCandidate.kind) == kind.value, col(BlobCandidate.blob_id) == blob_id, col(BlobCandidate.marked_at) <= cutoff
        )
    )
    if not taken.rowcount:
        return False
    return not referenced(session, kind, blob_id)


def pending(session: Session) -> int:
    """How many blobs are marked."""
    return int(session.exec(select(func.count()).select_from(BlobCandidate)).one())
