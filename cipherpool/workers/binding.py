"""Binding a pool node to a model and unbinding it, run on the node itself, top to bottom.

The database row (``Worker``) is the truth about what should run; this module makes the
node match it and reports back (RUNNING, STOPPED, or FAILED with the reason). The node's
hooks hear every moment: model loaded, bound, unbound, load failed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import NotRequired, TypedDict

from celery import Celery

from cipherpool.db.tables import WorkerStatus
from cipherpool.errors import CipherpoolError, WorkerStartFailed
from cipherpool.fhe.evaluator import ConcreteEvaluator
from cipherpool.names import model_queue
from cipherpool.services.workers import binding_to_load, finish, mark_running
from cipherpool.store import BlobKind
from cipherpool.workers.context import PlatformContext
from cipherpool.workers.hooks import BindingEvent
from cipherpool.workers.node import Binding, NodeRuntime

log = logging.getLogger("cipherpool.node")
CONTROL_REPLY_TIMEOUT_S = 10.0


class BindOutcome(TypedDict):
    """What a bind or unbind task answers: whether the node now serves the worker, on which queue."""

    bound: bool
    queue: NotRequired[str]
    reason: NotRequired[str]


def bind(ctx: PlatformContext, runtime: NodeRuntime, app: Celery, worker_id: str) -> BindOutcome:
    """Load the worker's model and consume its queue; the outcome is written to its row."""
    with runtime.bind_lock:
        with ctx.session() as session:
            found = binding_to_load(session, worker_id, runtime.name)
        if found is None:
            return {"bound": False, "reason": "the binding is over"}
        worker, model = found
        current = runtime.binding
        if current is not None and current.worker_id == worker_id:
            return {"bound": True, "queue": current.queue}
        event = BindingEvent(runtime.name, worker_id, model.id, model.name)
        if current is not None:  # claims are atomic, so only a stale message gets here
            _fail(ctx, runtime, event, f"{runtime.name} serves another worker")
            raise WorkerStartFailed(f"Node {runtime.name} already serves model {current.model_name!r}.")
        queue = model_queue(model.id)
        workdir = _workdir(ctx, model.id)
        try:
            server_zip = ctx.store.get(BlobKind.SERVER_ZIP, model.server_blob)
            evaluator = runtime.load_evaluator(event, server_zip, workdir)
            runtime.set_binding(Binding(worker_id, model.id, model.name, queue, evaluator, runtime.name, workdir))
            _consume(app, runtime.name, queue, start=True)
        except Exception as exc:  # any failure to load is reported on the binding, not lost
            runtime.set_binding(None)
            shutil.rmtree(workdir, ignore_errors=True)
            reason = exc.message if isinstance(exc, CipherpoolError) else f"{type(exc).__name__}: {exc}"
            log.exception("bind %s on %s failed", worker_id, runtime.name)
            _fail(ctx, runtime, event, reason)
            raise WorkerStartFailed(f"Loading model {model.name!r} on {runtime.name} failed: {reason}") from None
        with ctx.session() as session:
            mark_running(session, worker_id)
        runtime.hooks.binding_bound(event)
        log.info("node %s serves model %s (%s) on %s", runtime.name, model.name, model.id, queue)
        return {"bound": True, "queue": queue}


def unbind(ctx: PlatformContext, runtime: NodeRuntime, app: Celery, worker_id: str) -> BindOutcome:
    """Stop consuming first (queued queries wait for another node), then unload."""
    with runtime.bind_lock:
        current = runtime.binding
        if current is not None and current.worker_id == worker_id:
            _consume(app, runtime.name, current.queue, start=False)
            runtime.set_binding(None)
            if current.workdir:
                shutil.rmtree(current.workdir, ignore_errors=True)
            runtime.hooks.binding_unbound(current.event)
        with ctx.session() as session:
            finish(session, worker_id, WorkerStatus.STOPPED)
        return {"bound": False}


def default_evaluator_factory(server_zip: bytes, workdir: Path) -> ConcreteEvaluator:
    return ConcreteEvaluator(server_zip, workdir)


def _fail(ctx: PlatformContext, runtime: NodeRuntime, event: BindingEvent, reason: str) -> None:
    with ctx.session() as session:
        finish(session, event.worker_id, WorkerStatus.FAILED, error=reason)
    runtime.hooks.binding_load_failed(event, reason)


def _consume(app: Celery, node: str, queue: str, start: bool) -> None:
    """Start or stop consuming a queue via a control command to this very node (it is handled
    by the consumer thread, which owns the broker connection)."""
    if start:
        replies = app.control.add_consumer(queue, destination=[node], reply=True, timeout=CONTROL_REPLY_TIMEOUT_S)
    else:
        replies = app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=CONTROL_REPLY_TIMEOUT_S)
    if not replies:
        raise WorkerStartFailed(f"Node {node} did not confirm {'consuming' if start else 'leaving'} {queue}.")


def _workdir(ctx: PlatformContext, model_id: str) -> Path:
    base = ctx.settings.data_dir / "node-models"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=base))
