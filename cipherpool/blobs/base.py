"""What every backend of the blob store does, and the names it is given.

A backend keeps two kinds of objects, each named by the string that is its Redis key in the
Redis backend (``cipherpool:blob:evk:<sha256>``, ``cipherpool:upload:<uuid>``, ...), so that
the three backends share one vocabulary and the Redis one is exactly what the platform stored
before backends existed:

* **permanent** objects, the content-addressed blobs (``cipherpool:blob:<kind>:<sha256>``):
  no expiry, written whole, removed only when the database no longer references them;
* **temporaries** with a deadline: uploads being streamed in (``cipherpool:upload:``), staged
  deployment artifacts (``cipherpool:staged:<account>:<sha256>``) and query payloads
  (``cipherpool:payload:<ref>``). A temporary past its deadline reads as missing at once and
  its bytes are reclaimed by :meth:`Backend.sweep` (Redis: by its own TTL).

``persist`` turns a temporary into a permanent object in one step (a rename where the backend
has one), which is how "nothing uploaded lives unowned" holds: the bytes are a temporary until
a database row owns them (see :mod:`cipherpool.store`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from cipherpool.errors import NotFound, StoreFull
from cipherpool.names import BLOB_PREFIX, PAYLOAD_PREFIX, STAGED_PREFIX, UPLOAD_PREFIX

ROOT_PREFIX = "cipherpool:"
AREAS = {BLOB_PREFIX: "blob", UPLOAD_PREFIX: "upload", STAGED_PREFIX: "staged", PAYLOAD_PREFIX: "payload"}
TEMPORARY_AREAS = ("upload", "staged", "payload")
# One part of a name: ids the platform mints (hex, uuids, account ids, kinds). Anything else
# (a dot, a slash) is refused, so a name can never reach outside the store's directory.
_PART = re.compile(r"[A-Za-z0-9_-]{1,128}")
USAGE_REFRESH_S = 10.0  # how long a backend's measured size is trusted, plus what this process wrote since


def parts_of(name: str) -> list[str]:
    """A name as its area and parts: ``cipherpool:blob:evk:<sha>`` -> ``["blob", "evk", "<sha>"]``.
    A name that is not one of the store's (or holds anything but safe characters) is not found."""
    for prefix, area in AREAS.items():
        if name.startswith(prefix):
            rest = name[len(prefix) :].split(":")
            if rest and all(_PART.fullmatch(p) for p in rest):
                return [area, *rest]
            break
    raise NotFound(f"{name[:40]!r} is not a name in the blob store.")


def name_of(parts: list[str]) -> str:
    """The inverse of :func:`parts_of`."""
    return ROOT_PREFIX + ":".join(parts)


def is_upload(name: str) -> bool:
    return name.startswith(UPLOAD_PREFIX)


class Backend(Protocol):
    """Where the bytes live. Every method raises cipherpool's errors: :class:`StoreFull`
    (no room: Redis maxmemory, ENOSPC/EDQUOT, a bucket quota, ``blob_store_max_bytes``),
    :class:`BrokerUnavailable` (the store did not answer); a missing object is ``None``,
    ``False`` or ``0``, as each method says, never an exception."""

    kind: str  # "fs", "s3" or "redis"

    def describe(self) -> str:
        """Where it is, fit to print (no secret)."""
        ...

    def ping(self) -> None: ...

    # -- permanent objects --------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        """Write a whole object; one that exists already is left as it is (same content)."""
        ...

    def get(self, name: str) -> bytes | None: ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int:
        """Its size in bytes; 0 when missing."""
        ...

    def head(self, name: str, n: int) -> bytes:
        """Its first n bytes (a temporary's too); empty when missing."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object or a temporary; nothing when missing."""
        ...

    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Every permanent object whose name starts with prefix, with its size."""
        ...

    # -- temporaries ---------------------------------------------------------------------

    def append(self, name: str, chunk: bytes, ttl_s: int) -> None:
        """Add to an upload in progress, its deadline ttl_s from now."""
        ...

    def put_temp(self, name: str, data: bytes, ttl_s: int) -> None: ...

    def get_temp(self, name: str) -> bytes | None:
        """A temporary before its deadline; None after it, or when missing."""
        ...

    def expire(self, name: str, ttl_s: int) -> None:
        """Give a temporary a new deadline; nothing when missing."""
        ...

    def persist(self, temp: str, name: str) -> bool:
        """The temporary becomes the permanent object ``name`` (no deadline). False when the
        temporary is missing or past its deadline."""
        ...

    def move(self, temp: str, name: str, ttl_s: int) -> bool:
        """The temporary becomes the temporary ``name``, deadline ttl_s from now. False as above."""
        ...

    def sweep(self) -> int:
        """Reclaim temporaries past their deadline; how many were removed."""
        ...

    def used_bytes(self) -> int:
        """What the store holds now (permanent objects and temporaries), as measured."""
        ...


class SizeCap:
    """``blob_store_max_bytes`` for a backend without a quota of its own (a bucket on a server
    without quotas, a directory on a disk shared with other things): a write that would take
    the store past the cap is refused with :class:`StoreFull`.

    The size is measured (a walk of the directory, a listing of the bucket) at most every
    USAGE_REFRESH_S seconds, and what this process wrote since is added, so the cap holds
    exactly for one writer and within what other processes wrote in those seconds for several."""

    def __init__(self, cap_bytes: int, measure: Callable[[], int], clock: Callable[[], float] = time.monotonic):
        self.cap_bytes = cap_bytes
        self._measure, self._clock = measure, clock
        self._measured, self._since, self._at = 0, 0, float("-inf")
        self._lock = threading.Lock()

    def charge(self, size: int) -> None:
        """Count size bytes about to be written, or refuse them."""
        if self.cap_bytes <= 0:
            return
        with self._lock:
            if self._clock() - self._at > USAGE_REFRESH_S:
                self._measured, self._since, self._at = self._measure(), 0, self._clock()
            if self._measured + self._since + size > self.cap_bytes:
                raise StoreFull(
                    f"The blob store is full ({self._measured + self._since} of {self.cap_bytes} bytes, "
                    f"CIPHERPOOL_BLOB_STORE_MAX_BYTES): try later, or ask the operator to raise the cap."
                )
            self._since += size

    def forget(self) -> None:
        """Measure again at the next write (something was removed)."""
        with self._lock:
            self._at = float("-inf")


def full_message(where: str, detail: str) -> str:
    return f"The platform's blob store is full ({where}: {detail}): try later, or ask the operator to make room."
