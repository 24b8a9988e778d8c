"""A pool node's disk cache of content-addressed blobs, in front of the store.

A node reads a model's server.zip when it binds and each evaluation key at its first query;
keys are 35-77 MB and more. Kept on the node's own disk (``<data dir>/blob-cache/<node>``,
directories 0700, files 0600), a restarted or rebound node finds them there instead of fetching
them again from S3 or a shared mount. (The deserialized keys in memory are another cache,
:mod:`cipherpool.fhe.keycache`; this one survives the process.)

Bounded in bytes (``CIPHERPOOL_NODE_BLOB_CACHE_BYTES``): the least recently used files are
removed until a new one fits; a blob larger than the whole cache is not kept. The order
survives a restart (a hit sets the file's modification time). Every read is verified against
the blob's sha256 (its name): a file that does not match is removed and fetched again. Writes
are whole (a file in ``.tmp`` renamed into place), so a node killed mid-write leaves nothing
half-written. The cache is best effort: a disk that is full or failing means a fetch, never an
error. Figures (hits, misses, bytes) are counted since the process started, reported in the
node's stats (``blob_cache``, an operator's view) and kept in ``figures.json`` in the cache's
folder after each read (:func:`read_figures`), where a test or a benchmark on the node's host
reads them whatever the API shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cipherpool.files import DIR_MODE, FILE_MODE, private_dir

log = logging.getLogger("cipherpool.blobcache")
TMP_DIR = ".tmp"
FIGURES_FILE = "figures.json"
_SHA = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z]{1,16}")


@dataclass
class CacheFigures:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0  # files that did not match their sha256 (removed, fetched again)
    entries: int = 0
    bytes: int = 0  # on disk now
    capacity_bytes: int = 0
    fetched_bytes: int = 0  # read from the store on a miss
    served_bytes: int = 0  # read from this disk on a hit

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DiskCache:
    def __init__(self, root: Path, capacity_bytes: int):
        self.root = Path(root).expanduser()
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()  # "<kind>/<sha>" -> size, least recently used first
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._figures = CacheFigures(capacity_bytes=capacity_bytes)
        self.since = time.time()
        private_dir(self.root / TMP_DIR)
        self._index()
        self._save()

    def _index(self) -> None:
        """What an earlier run of this node left, oldest use first; then trimmed to the bound."""
        for leftover in (self.root / TMP_DIR).iterdir():
            leftover.unlink(missing_ok=True)
        found = []
        for kind_dir in self.root.iterdir():
            if not kind_dir.is_dir() or kind_dir.name == TMP_DIR:
                continue
            for file in kind_dir.iterdir():
                if _SHA.fullmatch(file.name):
                    stat = file.stat()
                    found.append((stat.st_mtime, f"{kind_dir.name}/{file.name}", stat.st_size))
        for _, key, size in sorted(found):
            self._entries[key] = size
        with self._lock:
            self._evict(0)
            self._count()

    def get(self, kind: str, blob_id: str, fetch: Callable[[], bytes]) -> bytes:
        """The blob from this disk, verified; else ``fetch()`` (the store, which verifies
        it too), kept here for next time. One fetch per blob at a time: concurrent first
        reads of one key wait for it."""
        if not (_SHA.fullmatch(blob_id) and _KIND.fullmatch(kind)):
            return fetch()
        key = f"{kind}/{blob_id}"
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            data = self._read(key, blob_id)
            if data is None:
                with self._lock:
                    self._figures.misses += 1
                data = fetch()
                with self._lock:
                    self._figures.fetched_bytes += len(data)
                self._keep(key, data)
        self._save()
        return data

    def figures(self) -> CacheFigures:
        with self._lock:
            self._count()
            return CacheFigures(**asdict(self._figures))

    def _save(self) -> None:
        """The figures, for whoever reads them on this host (best effort: a full disk skips it)."""
        record = {"since": self.since, "pid": os.getpid(), **self.figures().as_dict()}
        tmp = self.root / TMP_DIR / f"{FIGURES_FILE}.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.root / FIGURES_FILE)
        except OSError:
            tmp.unlink(missing_ok=True)

    def contains(self, kind: str, blob_id: str) -> bool:
        with self._lock:
            return f"{kind}/{blob_id}" in self._entries

    def _read(self, key: str, blob_id: str) -> bytes | None:
        with self._lock:
            if key not in self._entries:
                return None
        path = self.root / key
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != blob_id:
            with self._lock:
                if data is not None:
                    self._figures.corrupt += 1
                    log.warning("blob cache: %s did not match its sha256; removed", path)
                self._drop(key)
            return None
        now = time.time()
        try:
            os.utime(path, (now, now))  # the order of use survives a restart
        except OSError:
            pass
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            self._figures.hits += 1
            self._figures.served_bytes += len(data)
        return data

    def _keep(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity_bytes:
            return
        with self._lock:
            self._evict(len(data))
        path, tmp = self.root / key, self.root / TMP_DIR / uuid.uuid4().hex
        try:
            path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or failing disk: the next read fetches again
            tmp.unlink(missing_ok=True)
            log.warning("blob cache: could not keep %s: %s", key, exc)
            return
        with self._lock:
            self._entries[key] = len(data)
            self._entries.move_to_end(key)
            self._evict(0)  # another thread may have added meanwhile

    def _evict(self, room: int) -> None:
        """Drop the least recently used until ``room`` more bytes fit (call with the lock)."""
        while self._entries and sum(self._entries.values()) + room > self.capacity_bytes:
            key = next(iter(self._entries))
            self._drop(key)
            self._figures.evictions += 1

    def _drop(self, key: str) -> None:
        self._entries.pop(key, None)
        try:
            (self.root / key).unlink(missing_ok=True)
        except OSError:
            pass

    def _count(self) -> None:
        self._figures.entries = len(self._entries)
        self._figures.bytes = sum(self._entries.values())


def read_figures(root: Path) -> dict[str, float] | None:
    """The figures a node's cache last saved in ``root`` (with ``since`` and ``pid``, its
    process's), or None when it saved none."""
    try:
        figures: dict[str, float] = json.loads((Path(root) / FIGURES_FILE).read_text())
    except (OSError, ValueError):
        return None
    return figures
