"""`cipherpool store check` and `cipherpool store migrate`: the database's references against
the store's blobs.

The database says which blobs must exist: every model version's client.zip and server.zip
(``model_versions.client_blob``, ``server_blob``) and every live key set's evaluation key
(``evaluation_keys.blob_id``; an expired key set no longer references its blob). A referenced
blob the store lacks is *missing* (a query or a bind with it fails); a blob nothing references
is an *orphan* (a removed key set's, waiting for beat's sweep, or left by a crash).

Migration copies what an older release kept in Redis into the configured store: each
referenced blob is read from Redis (sha256-verified), written to the store and read back
(verified again), one at a time, so a run stopped anywhere is resumed by running it again, and
a second run copies nothing. Only with ``delete_source`` is a blob removed from Redis, after
the store's copy was verified, and then unreferenced ones too (no process of this release
reads blobs from Redis when the store is elsewhere). It is a command of its own, not a step of
`cipherpool db upgrade`: migrations stay quick, transactional and self-contained (they touch
the database only), while this one moves gigabytes between two other servers and may be
stopped and resumed. `cipherpool up` runs it at start when its Redis still holds blobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cipherpool.db.tables import EvaluationKey, Model, ModelVersion
from cipherpool.errors import NotFound
from cipherpool.store import BlobKind, BlobStore

Ref = tuple[BlobKind, str]


def referenced(session: Session) -> dict[Ref, list[str]]:
    """Every blob the database references, with who references it (for the operator)."""
    found: dict[Ref, list[str]] = {}
    rows = session.exec(
        select(Model.name, ModelVersion.number, ModelVersion.client_blob, ModelVersion.server_blob).join(
            Model, col(Model.id) == col(ModelVersion.model_id)
        )
    ).all()
    for name, number, client, server in rows:
        found.setdefault((BlobKind.CLIENT_ZIP, client), []).append(f"model {name} v{number} client.zip")
        found.setdefault((BlobKind.SERVER_ZIP, server), []).append(f"model {name} v{number} server.zip")
    keys = select(EvaluationKey.key_id, EvaluationKey.token_id, EvaluationKey.blob_id)
    expired_at = getattr(EvaluationKey, "expired_at", None)
    if expired_at is not None:  # an expired key set keeps its row, not its blob
        keys = keys.where(col(expired_at).is_(None))
    for key_id, token_id, blob_id in session.exec(keys).all():
        found.setdefault((BlobKind.EVALUATION_KEY, blob_id), []).append(f"key set {key_id[:12]} of token {token_id}")
    return found


@dataclass
class CheckReport:
    store: str
    referenced: int
    stored: int
    stored_bytes: int
    missing: list[dict[str, object]] = field(default_factory=list)
    orphans: list[dict[str, object]] = field(default_factory=list)
    orphan_bytes: int = 0
    legacy_in_redis: int | None = None  # blobs still in the platform's Redis (store elsewhere): migrate them

    @property
    def ok(self) -> bool:
        return not self.missing


def check(refs: dict[Ref, list[str]], store: BlobStore, legacy: BlobStore | None = None) -> CheckReport:
    stored = store.blobs()
    report = CheckReport(
        store=store.backend.describe(), referenced=len(refs), stored=len(stored), stored_bytes=sum(stored.values())
    )
    for (kind, blob_id), owners in sorted(refs.items()):
        if (kind, blob_id) not in stored:
            report.missing.append({"kind": kind.value, "blob_id": blob_id, "referenced_by": owners})
    for (kind, blob_id), size in sorted(stored.items()):
        if (kind, blob_id) not in refs:
            report.orphans.append({"kind": kind.value, "blob_id": blob_id, "size_bytes": size})
            report.orphan_bytes += size
    if legacy is not None:
        report.legacy_in_redis = len(legacy.blobs())
    return report


@dataclass
class MigrateReport:
    source: str
    target: str
    referenced: int = 0
    copied: int = 0
    copied_bytes: int = 0
    already: int = 0  # in the store before this run
    missing: list[dict[str, object]] = field(default_factory=list)  # in neither: `store check` lists them too
    deleted_from_source: int = 0
    left_in_source: int = 0  # unreferenced blobs still in Redis (without delete_source)


def migrate(
    refs: dict[Ref, list[str]],
    source: BlobStore,
    target: BlobStore,
    *,
    delete_source: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
) -> MigrateReport:
    """Copy every referenced blob from ``source`` (the platform's Redis) into ``target``."""
    report = MigrateReport(source=source.backend.describe(), target=target.backend.describe(), referenced=len(refs))
    in_source = source.blobs()
    for (kind, blob_id), owners in sorted(refs.items()):
        if target.exists(kind, blob_id):
            report.already += 1
            if delete_source and (kind, blob_id) in in_source:
                target.get(kind, blob_id)  # verified before the source goes (NotFound if corrupt: both stay)
        elif (kind, blob_id) in in_source:
            data = source.get(kind, blob_id)  # verified: its sha256 is its name
            target.put(kind, data)
            try:
                target.get(kind, blob_id)  # read back and verified before the source may go
            except NotFound as exc:
                raise NotFound(
                    f"The store's copy of {kind.value} blob {blob_id[:12]}… did not verify; "
                    "nothing was removed from Redis: run the migration again."
                ) from exc
            report.copied += 1
            report.copied_bytes += len(data)
            progress(f"copied {kind.value} {blob_id[:12]}… ({len(data)} bytes) for {owners[0]}")
        else:
            report.missing.append({"kind": kind.value, "blob_id": blob_id, "referenced_by": owners})
            continue
        if delete_source and (kind, blob_id) in in_source:
            source.delete(kind, blob_id)
            report.deleted_from_source += 1
    for kind, blob_id in in_source.keys() - refs.keys():
        if delete_source:
            source.delete(kind, blob_id)
            report.deleted_from_source += 1
        else:
            report.left_in_source += 1
    return report
