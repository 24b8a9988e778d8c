"""The signature of an alert's webhook call, and how a receiver checks it.

Every call carries ``X-Cipherpool-Signature: t=<unix seconds>,v1=<hex>``, where the hex is the
HMAC-SHA256, keyed with the rule's webhook secret, of ``"<t>.<body>"`` (the timestamp, a dot
and the raw body bytes, exactly as received). The timestamp is signed with the body, so that a
call recorded by someone on the way cannot be replayed later: a receiver refuses a timestamp
further than a few minutes from its own clock. Each retry is signed afresh.

A receiver verifies the raw body before parsing it::

    from cipherpool.alerts.signature import SIGNATURE_HEADER, verify

    if not verify(secret, request.headers[SIGNATURE_HEADER], raw_body, tolerance_s=300):
        return 401

or, without cipherpool: split the header on ``,`` and ``=``, recompute
``hmac.new(secret.encode(), f"{t}.".encode() + raw_body, hashlib.sha256).hexdigest()`` and
compare it with ``v1`` using ``hmac.compare_digest``. This module uses the standard library
only: importing it pulls in nothing of the platform's server side (no database, broker or
Celery), so a receiver with the client package installed can use it as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Cipherpool-Signature"
EVENT_HEADER = "X-Cipherpool-Event"  # fired | cleared, for receivers that route before parsing
SCHEME = "v1"  # HMAC-SHA256; a new scheme would be sent beside it, so receivers can move over
DEFAULT_TOLERANCE_S = 300.0  # how far a timestamp may be from the receiver's clock (seconds)


def digest(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with ``secret``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header's value for ``body`` signed now (or at ``timestamp``, unix seconds)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SCHEME}={digest(secret, t, body)}"


def parse(header: str) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` signatures of a header; ValueError if it is not one."""
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise ValueError(f"not a signature header: {header[:100]!r}")
        if key == "t":
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise ValueError(f"a signature header needs t= and {SCHEME}=: {header[:100]!r}")
    return timestamp, signatures


def verify(
    secret: str, header: str | None, body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance_s`` of
    ``now``. False (never an exception) for a missing, malformed, stale or wrong signature:
    whatever the reason, the receiver's answer is the same refusal."""
    if not header:
        return False
    try:
        timestamp, signatures = parse(header)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = digest(secret, timestamp, body)
    return any(hmac.compare_digest(expected.encode(), given.encode()) for given in signatures)
