"""Beat's key sweep: key sets' last uses, their expiry, and the blobs nothing references.

Each run, every ``key_sweep_interval_s``:

1. flushes the last uses recorded in Redis (:mod:`cipherpool.services.keyuse`) into the key
   sets' rows;
2. expires the key sets of expired or revoked tokens, and those unused for
   ``key_idle_expiry_s``; deletes the rows of key sets expired longer than that;
3. removes from the store each blob marked at least ``blob_sweep_grace_s`` ago that nothing
   references then, one blob per transaction (:func:`cipherpool.services.blobs.claim`).

Every step reads the state afresh and is safe to run twice or in two beats at once: a use
is never moved back, an expired key set is not expired again, and a blob's mark is claimed by
one sweep only. A blob whose removal fails keeps its mark, for the next run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import redis

from cipherpool.clock import utcnow
from cipherpool.context import PlatformContext
from cipherpool.errors import CipherpoolError
from cipherpool.services import blobs, keysets, keyuse

log = logging.getLogger("cipherpool.keys")


@dataclass
class SweepReport:
    uses: int = 0  # last uses flushed into the database
    expired_tokens: int = 0  # key sets expired with their token
    expired_idle: int = 0  # key sets expired unused
    purged: int = 0  # rows of long-expired key sets deleted
    removed: int = 0  # blobs removed from the store
    kept: int = 0  # marked blobs found referenced again (their mark dropped)
    failed: int = 0  # removals that failed (kept marked, for the next run)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(ctx: PlatformContext, now: datetime | None = None) -> SweepReport:
    now = now or utcnow()
    s, report = ctx.settings, SweepReport()
    uses = keyuse.pending(ctx.store.redis)
    with ctx.session() as session:
        report.uses = keysets.apply_uses(session, uses)
    try:
        keyuse.flushed(ctx.store.redis, uses)
    except redis.RedisError as exc:  # flushed again next time: a use is never moved back
        log.warning("key sweep: could not forget the flushed last uses: %s", exc)
    with ctx.session() as session:
        report.expired_tokens = keysets.expire_of_dead_tokens(session, now)
    if s.key_idle_expiry_s:
        with ctx.session() as session:
            report.expired_idle = keysets.expire_idle(session, s.key_idle_expiry_s, now)
            report.purged = keysets.purge_expired(session, now - timedelta(seconds=s.key_idle_expiry_s))
    remove_unreferenced(ctx, now - timedelta(seconds=s.blob_sweep_grace_s), report)
    if report.expired_tokens or report.expired_idle or report.removed or report.failed:
        log.info("key sweep: %s", report.as_dict())
    return report


def remove_unreferenced(ctx: PlatformContext, cutoff: datetime, report: SweepReport) -> None:
    """Remove each blob marked at or before ``cutoff`` that nothing references: claimed, then
    removed from the store, then committed, in one transaction per blob."""
    with ctx.session() as session:
        due = blobs.due(session, cutoff)
    for kind, blob_id in due:
        try:
            with ctx.session() as session:
                if not blobs.claim(session, kind, blob_id, cutoff):
                    report.kept += 1
                    continue
                ctx.store.delete(kind, blob_id)  # before the commit: the claim holds the mark meanwhile
            report.removed += 1
        except CipherpoolError as exc:  # the store refused or is away: the mark stays, for the next run
            report.failed += 1
            log.warning("key sweep: could not remove %s blob %s…: %s", kind.value, blob_id[:12], exc)
