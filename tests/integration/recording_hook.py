"""A node hook that tests plug into real pool nodes through CIPHERPOOL_NODE_HOOKS.

It appends one JSON line per moment to ``<data dir>/hook-events.jsonl``, so a test can see,
from outside the node process, that a hook named in the settings was built and heard queries,
refusals and bindings."""

from __future__ import annotations

import ctypes
import json
import threading

from cipherpool.context import platform
from cipherpool.errors import CipherpoolError
from cipherpool.workers.hooks import BindingEvent, Hook, QueryEvent

EVENTS_FILE = "hook-events.jsonl"


class FileRecorder(Hook):
    def __init__(self) -> None:
        self.path = platform().settings.data_dir / EVENTS_FILE
        self.lock = threading.Lock()

    def _write(self, **record: object) -> None:
        with self.lock, open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")

    def query_computed(self, query: QueryEvent) -> None:
        self._write(
            moment="computed",
            task_id=query.task_id,
            worker_id=query.worker_id,
            model_id=query.model_id,
            spin_ms=openmp_blocktime(),
        )

    def query_refused(self, query: QueryEvent, error: CipherpoolError) -> None:
        self._write(moment="refused", task_id=query.task_id, worker_id=query.worker_id, code=error.code)

    def binding_bound(self, binding: BindingEvent) -> None:
        self._write(moment="bound", worker_id=binding.worker_id, model_id=binding.model_id)


def openmp_blocktime() -> int | None:
    """The idle spin (ms) that the OpenMP runtime concrete loaded in this process uses, asked of
    the runtime itself (``kmp_get_blocktime``): what the node's environment made of it."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libomp" in line.rsplit("/", 1)[-1]}
    for path in paths:
        return int(ctypes.CDLL(path).kmp_get_blocktime())
    return None
