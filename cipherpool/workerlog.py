"""A worker's log: the lines a provider reads with ``cipherpool worker logs ID``.

What happened to one worker, from its claim to its stop (claimed, loading, loaded in how
long, up, standby, queries that failed, unbound, stopped and why), written by whichever
platform process saw it: the gateway or beat (decisions), the node (everything else, through
a hook). Kept in Redis, one capped list per worker, so a node writes without a database round
trip and a dead node's lines survive it. Lines never carry a ciphertext or a credential.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis

from cipherpool.names import WORKER_LOG_PREFIX

log = logging.getLogger("cipherpool.workerlog")
MAX_LINES = 1000  # per worker; older lines are dropped
KEEP_S = 7 * 86400  # a worker's log outlives its last line by this long


@dataclass(frozen=True)
class LogLine:
    n: int  # position in the worker's log, from 0 (stable while fewer than MAX_LINES were written)
    at: float  # epoch seconds
    level: str  # info, warning, error
    source: str  # the process that wrote it: a node name, "gateway", "beat"
    message: str


def write(redis: Redis, worker_id: str, message: str, *, level: str = "info", source: str = "platform") -> None:
    """Append a line; a failure to log is logged, never raised (it must not fail the work)."""
    line = json.dumps({"at": time.time(), "level": level, "source": source, "message": message})
    try:
        with redis.pipeline() as pipe:
            key = WORKER_LOG_PREFIX + worker_id
            pipe.rpush(key, line)
            pipe.ltrim(key, -MAX_LINES, -1)
            pipe.expire(key, KEEP_S)
            pipe.execute()
    except Exception:  # noqa: BLE001 - the log is best effort; the event log is the record
        log.warning("could not write a log line of worker %s", worker_id)


def read(redis: Redis, worker_id: str, after: int = -1) -> list[LogLine]:
    """The worker's lines after line ``after`` (-1: all that are kept)."""
    raw: list[Any] = redis.lrange(WORKER_LOG_PREFIX + worker_id, max(0, after + 1), -1)
    lines = []
    for offset, item in enumerate(raw):
        data = json.loads(item)
        lines.append(
            LogLine(max(0, after + 1) + offset, float(data["at"]), str(data["level"]), str(data["source"]), str(data["message"]))
        )
    return lines
