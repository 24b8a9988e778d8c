"""What the gateway depends on, seen from a request: whether each part answers now
(``GET /v1/ready``), and what a part's outage means to a client (a typed 503).

Liveness and readiness are apart, as load balancers and orchestrators expect: ``/v1/health``
answers 200 while the process runs (restarting a gateway fixes no database), ``/v1/ready``
answers 200 only while the database answers with its schema at this gateway's head, and the
broker, the store and (when it is a server of its own) the result backend answer. A load
balancer stops sending traffic to a gateway that is not ready and resumes by itself when it
is: the gateway starts whatever is down, and reconnects without a restart.

Checks run concurrently, each bounded by ``ready_timeout_s``; a check still running from an
earlier probe is joined, not started again, so a dependency that hangs costs one thread, not
one per probe. A schema found at head is trusted for ``ready_schema_cache_s``.

``/v1/ready`` is public and not rate limited (a load balancer has no credential), and each
check opens a broker connection and asks the database: so the whole answer is kept for
:data:`READY_CACHE_S` in each gateway process, and probes meanwhile (a flood included) share
it, or share the checks under way: at most one round of checks per second.

During an outage every request that needs the missing part gets a typed 503 with
Retry-After (:func:`outage_error`): ``database_unavailable`` or ``broker_unavailable``, never
the 502 of a gateway fault, which stays for what is one.

A **full store** is no outage: the platform's Redis at ``maxmemory`` (it refuses writes), or a
blob store that refused a write within :data:`FULL_RECENT_S` (``store_full``, 507, seen by this
gateway: a full disk or bucket, ``blob_store_max_bytes``). The store check then says so
(``full``) and the answer is ``degraded``, still 200: reads, polls, management and deletes
(which free room) are served, so a load balancer must keep sending them; uploads and queries
get 507 ``store_full`` meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from celery import Celery
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from cipherpool.api.schemas import ReadinessCheck
from cipherpool.config.settings import Settings, mask_url
from cipherpool.db import current_revision, get_engine, head_revision
from cipherpool.gateway.results import ResultWaiter
from cipherpool.outages import describe
from cipherpool.store import BlobStore
from cipherpool.waiting import StateLog

log = logging.getLogger("cipherpool.gateway")
READY_CACHE_S = 1.0  # a readiness answer is reused this long (per gateway process)
FULL_RECENT_S = 30.0  # a store_full answered this recently shows as a full store


class _Unready(Exception):
    """A part answered, but not as the gateway needs (the message says how)."""


Probe = Callable[[], Awaitable[str]]


class Readiness:
    """The checks behind ``GET /v1/ready``; one per gateway process."""

    def __init__(
        self,
        settings: Settings,
        celery: Celery,
        store: BlobStore,
        waiter: ResultWaiter,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._db_url = settings.effective_database_url()
        self._celery, self._store, self._waiter, self._clock = celery, store, waiter, clock
        self._timeout_s = settings.ready_timeout_s
        self._schema_cache_s = settings.ready_schema_cache_s
        results = settings.effective_result_backend()
        self._separate_results = results != settings.effective_store_url()
        # For the log only: the body is public, so it names no host.
        self._targets = {
            "database": mask_url(self._db_url),
            "schema": mask_url(self._db_url),
            "broker": mask_url(settings.effective_broker_url()),
            "store": mask_url(settings.effective_store_url()),
            "results": mask_url(results),
        }
        self._schema_ok_until = float("-inf")
        self._schema_detail = ""
        self._revisions: tuple[str, frozenset[str]] | None = None
        self._running: dict[str, asyncio.Future[str]] = {}
        self._states = {name: StateLog(log) for name in self._targets}
        self._answer: dict[str, ReadinessCheck] | None = None
        self._answer_until = float("-inf")
        self._checking: asyncio.Future[dict[str, ReadinessCheck]] | None = None
        self._refused_at = float("-inf")  # when this gateway last answered store_full
        self._full: str | None = None  # why the store is full, as its last check found

    def saw_full(self) -> None:
        """This gateway answered ``store_full``: the store shows as full for FULL_RECENT_S."""
        self._refused_at = self._clock()

    async def check(self) -> dict[str, ReadinessCheck]:
        """Each part's state: found within the last READY_CACHE_S, or checked now (a round
        already under way is joined: a probe that gives up does not cancel it for the others)."""
        if self._answer is not None and self._clock() < self._answer_until:
            return self._answer
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_all())
        return await asyncio.shield(self._checking)

    async def _check_all(self) -> dict[str, ReadinessCheck]:
        probes: dict[str, Probe] = {
            "database": lambda: run_in_threadpool(self._database),
            "schema": self._schema,
            "broker": lambda: run_in_threadpool(self._broker),
            "store": lambda: run_in_threadpool(self._ping_store),
        }
        if self._separate_results:
            probes["results"] = self._ping_results
        checks = await asyncio.gather(*(self._probe(name, probe) for name, probe in probes.items()))
        answer = dict(zip(probes, checks))
        if answer["store"].ok and self._full is not None:
            answer["store"] = answer["store"].model_copy(update={"full": True, "detail": self._full})
        self._answer, self._answer_until = answer, self._clock() + READY_CACHE_S
        return self._answer

    @staticmethod
    def degraded(checks: dict[str, ReadinessCheck]) -> bool:
        """Ready, but a store is full: writes are refused (507), the rest is served."""
        return any(check.full for check in checks.values())

    @staticmethod
    def summary(checks: dict[str, ReadinessCheck]) -> str | None:
        """Each failing part and why, in one line; None when every part is ready."""
        failing = [f"{name} {check.detail}" for name, check in checks.items() if not check.ok]
        return "; ".join(failing) or None

    async def _probe(self, name: str, probe: Probe) -> ReadinessCheck:
        started = self._clock()
        running = self._running.get(name)
        if running is None or running.done():
            running = asyncio.ensure_future(probe())
            running.add_done_callback(_consume)
            self._running[name] = running
        error: BaseException | None = None
        try:
            detail, ok = await asyncio.wait_for(asyncio.shield(running), self._timeout_s), True
        except TimeoutError:
            detail, ok = f"no answer within {self._timeout_s:g} s", False
        except _Unready as exc:
            detail, ok = str(exc), False
        except Exception as exc:  # noqa: BLE001 - whatever a dependency raises, it is not ready
            detail, ok, error = f"unreachable ({describe(exc).split(':')[0]})", False, exc
        self._note(name, ok, detail, error)
        return ReadinessCheck(ok=ok, detail=detail, elapsed_ms=round((self._clock() - started) * 1000, 1))

    def _note(self, name: str, ok: bool, detail: str, error: BaseException | None) -> None:
        """Log each change of a part's state once, not at every probe."""
        if ok:
            self._states[name].up("ready again: %s at %s", name, self._targets[name])
        else:
            self._states[name].down(
                "not ready: %s %s at %s%s", name, detail, self._targets[name], f" ({describe(error)})" if error else ""
            )

    def _database(self) -> str:
        path = self._db_url.removeprefix("sqlite:///")
        if path != self._db_url and not Path(path).exists():
            raise _Unready("has no file yet (not created: run `cipherpool db upgrade`)")  # asking must not create it
        with get_engine(self._db_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"

    async def _schema(self) -> str:
        if self._clock() < self._schema_ok_until:
            return self._schema_detail
        detail = await run_in_threadpool(self._read_schema)
        self._schema_detail, self._schema_ok_until = detail, self._clock() + self._schema_cache_s
        return detail

    def _read_schema(self) -> str:
        head, known = self._known_revisions()
        try:
            current = current_revision(self._db_url)
        except sa_exc.SQLAlchemyError as exc:
            raise _Unready("unknown (the database did not answer)") from exc
        if current == head:
            return f"at {head} (head)"
        if current is None:
            raise _Unready(f"not migrated (empty database), head is {head}")
        if current in known:
            raise _Unready(f"at {current}, head is {head}")
        # Migrated by a newer release: ready, so a rolling upgrade that migrates first does not
        # take every older gateway out of the load balancer at once (migrations stay compatible).
        return f"at {current}, newer than this gateway's head {head}"

    def _known_revisions(self) -> tuple[str, frozenset[str]]:
        """This package's head and every revision it ships: read once, they cannot change."""
        if self._revisions is None:
            from alembic.script import ScriptDirectory

            from cipherpool.db.migrate import alembic_config

            scripts = ScriptDirectory.from_config(alembic_config(""))
            self._revisions = head_revision(), frozenset(s.revision for s in scripts.walk_revisions())
        return self._revisions

    def _broker(self) -> str:
        """A fresh connection through the Celery app's own transport (a pooled one may look
        alive while the broker is not), tried twice at most."""
        conn = self._celery.connection_for_write(connect_timeout=self._timeout_s)
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=self._timeout_s)
        finally:
            conn.release()
        return "ok"

    def _ping_store(self) -> str:
        self._store.ping()
        self._full = self._fullness()
        return "ok"

    def _fullness(self) -> str | None:
        """Why the store refuses writes now, or None: the platform's Redis at maxmemory (what
        Redis itself compares: used memory less what eviction does not count), or a store_full
        answered within FULL_RECENT_S (any backend)."""
        memory = self._store.redis.info("memory")
        limit = int(memory.get("maxmemory", 0) or 0)
        used = int(memory.get("used_memory", 0)) - int(memory.get("mem_not_counted_for_evict", 0) or 0)
        if limit and used >= limit:
            return (
                f"full: Redis at maxmemory ({used} of {limit} bytes), writes refused (store_full); "
                "reads, polls and deletes served"
            )
        if self._clock() - self._refused_at < FULL_RECENT_S:
            return "full: a write was refused (store_full) within the last 30 s; reads, polls and deletes served"
        return None

    async def _ping_results(self) -> str:
        await self._waiter.ping()
        return "ok"


def _consume(future: asyncio.Future[str]) -> None:
    """Read a finished check's outcome, so that one nobody awaited any more (it outlived
    its probe's timeout) does not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()
