"""Each gateway's count of the requests it refused (:mod:`cipherpool.monitoring.refusals`).

Every typed refusal the gateway answers, from the guard (authentication, rate, body size) or
from a route (quota, no worker, credits, invalid input, ...), is added here, in memory: a
flood of refusals costs a counter increment each, not a Redis write. A task of the
gateway's lifespan writes what was counted every :data:`FLUSH_S` seconds in one round trip
and records the models' ``refusals`` events; a gateway that dies outright loses at most that
much of the figures, never an answer. A failed write is logged and dropped: figures are never
worth a request.

**Whom a refusal concerns.** The model a route noted (:func:`note_model`: the model a
ciphertext or a key upload is for, among the token's own); else a token's only model; else the
tenant the guard authenticated (an account's API key, a token of several models); else
nobody: counted platform-wide only (a failed authentication, a request with two
``Authorization`` headers). A model is only ever noted from the caller's own grant, so
nobody can make another tenant's figures move.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from cipherpool.context import PlatformContext
from cipherpool.errors import CipherpoolError
from cipherpool.monitoring import refusals
from cipherpool.monitoring.refusals import Refusal
from cipherpool.services import events
from cipherpool.services.queries import ModelGrant, TokenGrant
from cipherpool.statuses import EventKind
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.gateway")
FLUSH_S = 1.0
MODEL = "refusal_model"  # request state: the model id the request is for (noted by a route)
RELAYED = "refusal_relayed"  # request state: the error is a node's, relayed with a result


def note_model(request: Request, model: ModelGrant | None) -> None:
    """The request is for ``model``, one of the caller's own (a refusal is counted for it)."""
    if model is not None:
        request.state.refusal_model = model.model_id


def mark_relayed(request: Request) -> None:
    """The error answered is a node's (a query's result): the node counted it already."""
    request.state.refusal_relayed = True


def concerns(state: MutableMapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(model id, account id) that a request's refusal is counted for (see the module)."""
    state = state or {}
    principal = state.get("principal")
    account_id = getattr(principal, "account_id", None)
    noted = state.get(MODEL)
    if isinstance(noted, str):
        return noted, account_id
    if isinstance(principal, TokenGrant) and len(principal.models) == 1:
        return principal.models[0].model_id, account_id
    return None, account_id if isinstance(account_id, str) else None


class RefusalRecorder:
    def __init__(self, ctx: PlatformContext, clock: Callable[[], float] = time.time, flush_s: float = FLUSH_S):
        self._ctx, self._clock, self.flush_s = ctx, clock, flush_s
        self._counts: Counter[Refusal] = Counter()
        self._unreported: set[str] = set()  # models whose refusals no event has reported yet
        self._lock = threading.Lock()
        self._failing = StateLog(log)
        self._task: asyncio.Task[None] | None = None

    def add(self, error: CipherpoolError, state: MutableMapping[str, Any] | None) -> None:
        """Count ``error`` if it is a refusal (:func:`~cipherpool.monitoring.refusals.reason_of`)."""
        if refusals.reason_of(error) is None or (state or {}).get(RELAYED):
            return
        model_id, account_id = concerns(state)
        with self._lock:
            self._counts[Refusal(error.code, model_id, account_id)] += 1
            if model_id is not None:
                self._unreported.add(model_id)

    def pending(self) -> dict[Refusal, int]:
        """What is counted and not written yet."""
        with self._lock:
            return dict(self._counts)

    def flush(self) -> None:
        """Write what was counted, then record the models' events that are due (blocking)."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            models = set(self._unreported)
        if not counts and not models:
            return
        try:
            redis = self._ctx.store.redis
            if counts:
                refusals.write(redis, counts, self._clock())
            claimed, due = refusals.claim(redis, models)
            with self._lock:
                self._unreported -= claimed
            if due:
                self._record(due)
            self._failing.up("refusals: counted in Redis again")
        except Exception:  # noqa: BLE001 - figures are never worth a request
            lost = sum(counts.values())
            self._failing.down("refusals: %d not counted in Redis (dropped, and more until it works)", lost, exc_info=True)

    def _record(self, due: list[refusals.Pending]) -> None:
        now = self._clock()
        with self._ctx.session() as session:
            for pending in due:
                events.record_for(session, pending.model_id, EventKind.REFUSALS, pending.message(now))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cipherpool-refusals")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await run_in_threadpool(self.flush)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await run_in_threadpool(self.flush)
