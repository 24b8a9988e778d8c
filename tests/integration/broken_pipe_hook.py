"""A node hook that writes to a closed socket after every computed query, inside the node
process: what a node does when its broker connection breaks (a partition, a broker restart).

With SIGPIPE ignored, as Python sets it, the writes fail with EPIPE and the node goes on; with
the handler that concrete's runtime installs at the first FHE run, the process dies. Each try
appends one JSON line to ``<data dir>/broken-pipe.jsonl`` with what the write raised."""

from __future__ import annotations

import json
import os
import socket

from cipherpool.context import platform
from cipherpool.workers.hooks import Hook, QueryEvent

EVENTS_FILE = "broken-pipe.jsonl"


class BrokenPipeWriter(Hook):
    def __init__(self) -> None:
        self.path = platform().settings.data_dir / EVENTS_FILE

    def query_computed(self, query: QueryEvent) -> None:
        mine, theirs = socket.socketpair()
        theirs.close()
        outcome = "written"
        try:
            mine.send(b"x")
            mine.send(b"y")  # the peer is gone: EPIPE (or death by SIGPIPE)
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            mine.close()
        with open(self.path, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "task_id": query.task_id, "outcome": outcome}) + "\n")
