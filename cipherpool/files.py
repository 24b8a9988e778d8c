"""Files the platform and its clients write are private: directories 0700, files 0600.

Platform processes also run with umask 077 (see :func:`private_umask`), so files that Redis,
SQLite and Celery create on their own (AOF, WAL, logs) are private too.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory that only its owner can enter. Missing parents are
    created 0700 too (``mkdir(parents=True)`` would give them the default mode); existing
    parents are left as they are."""
    path = Path(path)
    missing = []
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            break
        missing.append(ancestor)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: str | bytes) -> Path:
    """Write a file that is 0600 from its first byte (never briefly world-readable)."""
    path = Path(path)
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, FILE_MODE)
    return path


def tighten_tree(root: Path) -> None:
    """Make everything under root private (after a library wrote files with its own modes)."""
    root = Path(root)
    if not root.exists():
        return
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, FILE_MODE)


def private_umask() -> int:
    """Set umask 077 for this process and its children; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def private_sqlite(url: str) -> None:
    """Create a SQLite database file 0600 before SQLite does (its WAL and shm files copy its
    mode): the database holds API-key and token hashes. Other URLs are left alone."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            write_private(path, b"")
        os.chmod(path, 0o600)
