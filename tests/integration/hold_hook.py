"""A node hook that holds every query before it starts while ``<data dir>/hold-queries`` exists,
as a node busy with a long query would: tests plug it in through CIPHERPOOL_NODE_HOOKS.

It holds from Celery's ``task_prerun``: after the node has sent the query's ``task-started``
event (so Flower shows it running) and before the node's query handler reads the clock, so the
hold is in the query's recorded queue wait, as the client's own measure has it too. At most
:data:`MAX_HOLD_S`, so a test that fails with the flag in place leaves no node stuck."""

from __future__ import annotations

import time
from typing import Any

from celery.signals import task_prerun

from cipherpool.context import platform
from cipherpool.names import QUERY_TASK
from cipherpool.workers.hooks import Hook

HOLD_FILE = "hold-queries"
MAX_HOLD_S = 30.0


class HoldQueries(Hook):
    def __init__(self) -> None:
        self.flag = platform().settings.data_dir / HOLD_FILE
        task_prerun.connect(self._hold, weak=False)

    def _hold(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) != QUERY_TASK:
            return
        deadline = time.monotonic() + MAX_HOLD_S
        while self.flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
