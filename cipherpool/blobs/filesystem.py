"""The filesystem backend: the embedded stack's default, and a shared mount in a cluster.

Layout under the root (``CIPHERPOOL_BLOB_DIR``, default ``<data dir>/blobs``), directories
0700 and files 0600:

    blob/<kind>/<sha[:2]>/<sha>      content-addressed blobs (no deadline)
    upload/<uuid>                    uploads being streamed in
    staged/<account>/<sha>           staged deployment artifacts
    payload/<ref>                    query payloads
    .tmp/                            whole writes in progress (same filesystem: renamed into place)

A whole object is written to ``.tmp``, flushed to disk and renamed into place, so a reader
never sees half of one, on one host or on several sharing the mount. A temporary's deadline is
its modification time, set into the future (``os.utime``): a read past it finds nothing, and
:meth:`FsBackend.sweep` unlinks it. An upload is appended to its own file, chunk by chunk, and
renamed when a database row owns it (``persist``): a rename on the same filesystem, so adopting
a 77 MB key moves no byte. ENOSPC and EDQUOT (a full disk, a quota) raise StoreFull.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cipherpool.blobs.base import TEMPORARY_AREAS, SizeCap, full_message, name_of, parts_of
from cipherpool.errors import BrokerUnavailable, StoreFull
from cipherpool.files import FILE_MODE, private_dir

T = TypeVar("T")
TMP_DIR = ".tmp"
STALE_TMP_S = 24 * 3600.0  # a whole write left in .tmp this long ago belonged to a process that died
# A temporary is swept this long after its deadline, not at it: an append writes its chunk (the
# file's mtime: now) and then sets the deadline (the mtime again), and a sweep in between,
# from a thread of its own (BlobStore._maybe_sweep), took the file for one past its deadline
# and deleted it, chunks written before included (seen in CI: FileNotFoundError on the utime).
SWEEP_GRACE_S = 1.0
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class FsBackend:
    kind = "fs"

    def __init__(self, root: Path, max_bytes: int = 0, clock: Callable[[], float] = time.time):
        self.root = Path(root).expanduser()
        self._clock = clock
        self.cap = SizeCap(max_bytes, self.used_bytes)
        self._made: set[Path] = set()
        self._guard(lambda: private_dir(self.root / TMP_DIR))

    def describe(self) -> str:
        return f"fs:{self.root}"

    def ping(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)):
            raise BrokerUnavailable(f"The blob store's directory {self.root} is missing or not writable.")

    # -- paths ---------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        parts = parts_of(name)
        if parts[0] == "blob" and len(parts) == 3:  # blob/<kind>/<sha[:2]>/<sha>: no directory of a million files
            return self.root.joinpath(parts[0], parts[1], parts[2][:2], parts[2])
        return self.root.joinpath(*parts)

    def _dir(self, path: Path) -> None:
        if path not in self._made:
            private_dir(path)  # missing parents 0700 too
            self._made.add(path)

    def _guard(self, action: Callable[[], T]) -> T:
        try:
            return action()
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise StoreFull(full_message(str(self.root), os.strerror(exc.errno or 0))) from exc
            raise BrokerUnavailable(f"The blob store's directory {self.root} failed: {exc}") from exc

    def _write_whole(self, path: Path, data: bytes, deadline: float | None) -> None:
        """``data`` at ``path``, all of it or nothing: a file in .tmp, flushed, renamed."""
        self.cap.charge(len(data))
        tmp = self.root / TMP_DIR / uuid.uuid4().hex

        def write() -> None:
            self._dir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if deadline is not None:
                    os.utime(tmp, (self._clock(), deadline))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        self._guard(write)

    def _live(self, path: Path) -> bool:
        """A temporary before its deadline."""
        try:
            return path.stat().st_mtime >= self._clock()
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(path: Path, n: int | None = None) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read() if n is None else f.read(n)
        except FileNotFoundError:
            return None

    # -- permanent objects ---------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        path = self.path(name)
        if not path.exists():
            self._write_whole(path, data, None)

    def get(self, name: str) -> bytes | None:
        return self._guard(lambda: self._read(self.path(name)))

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return 0

    def head(self, name: str, n: int) -> bytes:
        path = self.path(name)
        if parts_of(name)[0] in TEMPORARY_AREAS and not self._live(path):
            return b""
        return self._guard(lambda: self._read(path, n)) or b""

    def delete(self, name: str) -> None:
        self._guard(lambda: self.path(name).unlink(missing_ok=True))
        self.cap.forget()

    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Permanent objects under ``cipherpool:blob:`` (optionally ``<kind>:``)."""
        parts = parts_of(prefix + "x")[:-1]  # the prefix's own parts: ["blob"] or ["blob", kind]
        base = self.root.joinpath(*parts)
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            if not files:
                continue
            kind = Path(dirpath).relative_to(self.root / "blob").parts[0]  # blob/<kind>/<sha[:2]>
            for file in files:
                try:
                    size = os.stat(os.path.join(dirpath, file)).st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield name_of(["blob", kind, file]), size

    # -- temporaries ---------------------------------------------------------------------

    def append(self, name: str, chunk: bytes, ttl_s: int) -> None:
        path = self.path(name)
        self.cap.charge(len(chunk))

        def write() -> None:
            self._dir(path.parent)
            fresh = path.exists() and not self._live(path)  # past its deadline: gone, as a Redis key would be
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0), FILE_MODE)
            try:
                _write_all(fd, chunk)
            finally:
                os.close(fd)
            now = self._clock()
            os.utime(path, (now, now + ttl_s))

        self._guard(write)

    def put_temp(self, name: str, data: bytes, ttl_s: int) -> None:
        self._write_whole(self.path(name), data, self._clock() + ttl_s)

    def get_temp(self, name: str) -> bytes | None:
        path = self.path(name)
        if not self._live(path):
            return None
        return self._guard(lambda: self._read(path))

    def expire(self, name: str, ttl_s: int) -> None:
        path = self.path(name)
        now = self._clock()
        try:
            os.utime(path, (now, now + ttl_s))
        except FileNotFoundError:
            pass

    def persist(self, temp: str, name: str) -> bool:
        return self._rename(temp, name, None)

    def move(self, temp: str, name: str, ttl_s: int) -> bool:
        return self._rename(temp, name, self._clock() + ttl_s)

    def _rename(self, temp: str, name: str, deadline: float | None) -> bool:
        source, target = self.path(temp), self.path(name)
        if not self._live(source):
            source.unlink(missing_ok=True)
            return False

        def rename() -> None:
            with open(source, "rb+") as f:  # the upload's bytes on disk before a row points at them
                os.fsync(f.fileno())
            now = self._clock()
            os.utime(source, (now, deadline if deadline is not None else now))
            self._dir(target.parent)
            os.replace(source, target)

        try:
            self._guard(rename)
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, FileNotFoundError):  # swept or discarded meanwhile
                return False
            raise
        return True

    def sweep(self) -> int:
        now, removed = self._clock(), 0
        for area in TEMPORARY_AREAS:
            for dirpath, _dirs, files in os.walk(self.root / area):
                for file in files:
                    path = os.path.join(dirpath, file)
                    try:
                        if os.stat(path).st_mtime < now - SWEEP_GRACE_S:
                            os.unlink(path)
                            removed += 1
                    except FileNotFoundError:
                        continue
        for entry in os.scandir(self.root / TMP_DIR):
            try:
                if entry.stat().st_mtime < now - STALE_TMP_S:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
        if removed:
            self.cap.forget()
        return removed

    def used_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for file in files:
                try:
                    total += os.stat(os.path.join(dirpath, file)).st_size
                except FileNotFoundError:
                    continue
        return total


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
