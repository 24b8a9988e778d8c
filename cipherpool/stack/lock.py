"""One stack per data directory. A running stack holds an exclusive ``flock`` on
``<data dir>/stack.lock`` (0600) from before its first child starts until its last one stopped.
The kernel drops the lock with the process that held it, so a stack killed with SIGKILL
blocks nobody, unlike the ``stack.json`` it leaves behind, which nothing here trusts.

The lock file also says who holds it (JSON: pid, start time, and the gateway URL once the
stack is ready), for the refusal a second stack gets: two stacks on one data directory would
share one Redis AOF, one SQLite database and the same node names.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cipherpool.errors import Conflict
from cipherpool.files import FILE_MODE, private_dir

LOCK_FILE = "stack.lock"
READ_TRIES = 5  # the holder rewrites its file (truncate, then write): a reader may catch it empty


@dataclass
class StackLock:
    """The lock a running stack holds on its data directory (:meth:`acquire`)."""

    path: Path
    _fd: int | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def acquire(cls, data_dir: Path) -> StackLock:
        """Take the data directory's lock, or raise Conflict naming the stack that holds it."""
        path = private_dir(Path(data_dir)) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)  # never inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise running_elsewhere(Path(data_dir), holder(path)) from None
        os.fchmod(fd, FILE_MODE)
        lock = cls(path, fd)
        lock.record(pid=os.getpid(), started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def record(self, **info: Any) -> None:
        """Add to what the lock file says about this stack (e.g. its gateway URL once ready)."""
        if self._fd is None:
            return
        self.info.update(info)
        data = json.dumps(self.info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Let another stack start here (the file stays: removing it would race a new holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def check_free(data_dir: Path) -> None:
    """Raise Conflict if a stack runs on ``data_dir`` now (creates nothing if none ever did)."""
    path = Path(data_dir) / LOCK_FILE
    if not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise running_elsewhere(Path(data_dir), holder(path)) from None
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken


def holder(path: Path) -> dict[str, Any]:
    """What the lock file says about the stack holding it; {} if it cannot be read."""
    for _ in range(READ_TRIES):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        return info if isinstance(info, dict) else {}
    return {}


def running_elsewhere(data_dir: Path, info: dict[str, Any]) -> Conflict:
    pid = info.get("pid")
    url = info.get("url") or "not up yet (still starting)"
    started = info.get("started_at") or "an unknown time"
    stop = f"`kill {pid}`" if pid else "stop that process"
    return Conflict(
        f"A cipherpool stack is already running on data dir {data_dir}: pid {pid or 'unknown'}, gateway {url}, "
        f"started at {started}. Two stacks cannot share a data dir (one Redis AOF, one database, the same node "
        f"names): stop it first (Ctrl-C where it runs, or {stop}), or give this one another --data-dir."
    )
