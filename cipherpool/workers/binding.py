"""Binding a pool node to a model, rolling it onto other versions, and unbinding it, run on
the node itself, top to bottom.

The database row (``Worker``) is the truth about what should run; this module makes the
node match it and reports back (RUNNING, STOPPED, or FAILED with the reason). The node's
hooks hear every moment: model loaded, bound, unbound, load failed. A rollout
(:mod:`cipherpool.services.rollout`) loads a version beside the serving one in a background
thread, so the node keeps answering while it loads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import NotRequired, TypedDict

from celery import Celery

from cipherpool import affinity_queues
from cipherpool.announce import serving_changed
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Model, Worker, WorkerStatus
from cipherpool.dispatch import affinity_queue_of, query_queue
from cipherpool.errors import CipherpoolError, WorkerStartFailed
from cipherpool.fhe.evaluator import Evaluator
from cipherpool.names import ROLLOUT_LOCK_PREFIX
from cipherpool.services import events, rollout
from cipherpool.services.models import get_version, model_selector
from cipherpool.services.workers import binding_to_load, finish, mark_loading, mark_running, set_consuming
from cipherpool.statuses import EventKind
from cipherpool.store import BlobKind
from cipherpool.workers.hooks import BindingEvent
from cipherpool.workers.node import Binding, NodeRuntime

log = logging.getLogger("cipherpool.node")
CONTROL_REPLY_TIMEOUT_S = 10.0
ROLLOUT_LOCK_S = 900.0  # longest a node may hold a model's rollout lock (loading one version)
ROLLOUT_WAIT_S = 3600.0  # longest a node waits for the other nodes to finish a rollout
POLL_S = 1.0


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
        refusal = (
            f"{runtime.name} serves another worker"
            if current is not None  # claims are atomic: a stale message
            else runtime.refusal(model.hardware, model_selector(model))
        )
        if refusal is not None:
            _fail(ctx, runtime, event, refusal)
            raise WorkerStartFailed(f"Node {runtime.name} cannot serve model {model.name!r}: {refusal}.")
        with ctx.session() as session:
            mark_loading(session, worker_id)
        queue = query_queue(runtime.host_class, model.id).name
        workdir = _workdir(ctx, model.id)
        try:
            loaded: dict[int, Evaluator] = {}
            while missing := (wanted := _wanted(ctx, model.id))[0] - set(loaded):  # again if a rollout began meanwhile
                for number in sorted(missing):
                    loaded[number] = _load_version(ctx, runtime, event, model.id, number, workdir)
            serving = wanted[1] if wanted[1] in loaded else max(loaded)
            runtime.set_binding(
                Binding(
                    worker_id,
                    model.id,
                    model.name,
                    queue,
                    loaded[serving],
                    runtime.name,
                    workdir,
                    version=serving,
                    others={v: e for v, e in loaded.items() if v != serving},
                )
            )
            with ctx.session() as session:
                mark_running(session, worker_id, set(loaded))
            apply_standby(ctx, runtime, app, worker_id)
        except Exception as exc:  # any failure to load is reported on the binding, not lost
            runtime.set_binding(None)
            shutil.rmtree(workdir, ignore_errors=True)
            reason = exc.message if isinstance(exc, CipherpoolError) else f"{type(exc).__name__}: {exc}"
            log.exception("bind %s on %s failed", worker_id, runtime.name)
            _fail(ctx, runtime, event, reason)
            raise WorkerStartFailed(f"Loading model {model.name!r} on {runtime.name} failed: {reason}") from None
        wanted_now, serving_now, rolling = _wanted(ctx, model.id)
        if rolling is not None or wanted_now != set(loaded) or serving_now != serving:
            reload(ctx, runtime, worker_id)  # the model moved on while this node loaded: catch up
        runtime.hooks.binding_bound(event)
        log.info("node %s serves model %s (%s) on %s", runtime.name, model.name, model.id, queue)
        return {"bound": True, "queue": queue}


def apply_standby(ctx: PlatformContext, runtime: NodeRuntime, app: Celery, worker_id: str) -> BindOutcome:
    """Consume the model's queue or not, as the worker's row says (``standby``): a standby
    worker keeps its model loaded and resumes at once. Idempotent; the row's status follows.
    Under the bind lock: an unbind or a bind in progress finishes first."""
    with runtime.bind_lock:
        return _apply_standby(ctx, runtime, app, worker_id)


def _apply_standby(ctx: PlatformContext, runtime: NodeRuntime, app: Celery, worker_id: str) -> BindOutcome:
    binding = runtime.binding
    if binding is None or binding.worker_id != worker_id:
        return {"bound": False, "reason": "the node serves another worker"}
    with ctx.session() as session:
        worker = session.get(Worker, worker_id)
        standby = worker is not None and worker.standby
    if binding.consuming == standby:  # not yet where the row wants it
        _consume(ctx, app, runtime.name, binding.model_id, runtime.host_class, start=not standby)
        runtime.update_binding(worker_id, lambda b: replace(b, consuming=not standby))
    with ctx.session() as session:
        set_consuming(session, worker_id, not standby)
    serving_changed(ctx)
    return {"bound": True, "queue": binding.queue}


def unbind(ctx: PlatformContext, runtime: NodeRuntime, app: Celery, worker_id: str) -> BindOutcome:
    """Stop consuming first (queued queries wait for another node), then unload."""
    with runtime.bind_lock:
        current = runtime.binding
        if current is not None and current.worker_id == worker_id:
            if current.consuming:
                _consume(ctx, app, runtime.name, current.model_id, runtime.host_class, start=False)
            runtime.set_binding(None)
            if current.workdir:
                shutil.rmtree(current.workdir, ignore_errors=True)
            runtime.hooks.binding_unbound(current.event)
        with ctx.session() as session:
            finish(session, worker_id, WorkerStatus.STOPPED)
        serving_changed(ctx)
        return {"bound": False}


def reload(ctx: PlatformContext, runtime: NodeRuntime, worker_id: str) -> BindOutcome:
    """Load the versions the worker's model must hold now, in a background thread (queries
    keep being answered meanwhile); see :mod:`cipherpool.services.rollout`."""
    current = runtime.binding
    if current is None or current.worker_id != worker_id:
        return {"bound": False, "reason": "the node serves another worker"}
    threading.Thread(target=_roll, args=(ctx, runtime, worker_id), name=f"rollout-{worker_id}", daemon=True).start()
    return {"bound": True, "queue": current.queue}


def _roll(ctx: PlatformContext, runtime: NodeRuntime, worker_id: str) -> None:
    """Load what the model must hold (one node of the model at a time), report it, then wait
    for the rollout to end and, after the grace period, drop the versions nobody queries."""
    binding = runtime.binding
    if binding is None or binding.worker_id != worker_id:
        return
    model_id, event = binding.model_id, binding.event
    try:
        # A load longer than the lock's timeout lets another node in (two loads at once, no
        # harm); releasing a lock that expired must not turn a good load into a failure.
        with ctx.store.redis.lock(
            ROLLOUT_LOCK_PREFIX + model_id, timeout=ROLLOUT_LOCK_S, blocking_timeout=ROLLOUT_WAIT_S, raise_on_release_error=False
        ):
            wanted = _wanted(ctx, model_id)[0]
            for number in sorted(wanted - binding.versions):
                if binding.workdir is None:
                    break
                if not _add_version(
                    runtime, worker_id, number, _load_version(ctx, runtime, event, model_id, number, binding.workdir)
                ):
                    return  # unbound meanwhile
            held = runtime.binding.versions if runtime.binding else set()
            with ctx.session() as session:
                model = session.get(Model, model_id)
                target = model.rollout_version if model else None
                flipped = target is not None and target in held and rollout.worker_loaded(session, worker_id, target)
            if flipped:
                serving_changed(ctx)  # gateways take the new serving version (and its client specs) now
    except Exception as exc:  # the node keeps serving what it holds; the log says why
        if runtime.binding is None or runtime.binding.worker_id != worker_id:
            return  # unbound meanwhile (its directory went with it): nothing failed
        log.exception("rollout of %s on %s failed", model_id, runtime.name)
        with ctx.session() as session:
            events.record_for(
                session,
                model_id,
                EventKind.WORKER_FAILED,
                f"worker {worker_id} on {runtime.name} could not load the new version (it keeps serving the old one): {exc}",
                worker_id=worker_id,
            )
        return
    _retire_after_rollout(ctx, runtime, worker_id, model_id)


def _add_version(runtime: NodeRuntime, worker_id: str, number: int, evaluator: Evaluator) -> bool:
    return runtime.update_binding(worker_id, lambda b: b.with_version(number, evaluator)) is not None


def _retire_after_rollout(ctx: PlatformContext, runtime: NodeRuntime, worker_id: str, model_id: str) -> None:
    """Once no rollout is under way, wait until queries published for older versions have
    passed their deadline, then drop those versions."""
    deadline = time.monotonic() + ROLLOUT_WAIT_S
    while time.monotonic() < deadline and _wanted(ctx, model_id)[2] is not None:
        time.sleep(POLL_S)
    time.sleep(ctx.settings.effective_version_grace_s())
    wanted, serving, _ = _wanted(ctx, model_id)
    kept = runtime.update_binding(worker_id, lambda b: b.keeping(wanted, serving))
    if kept is not None:
        log.info("node %s holds versions %s of model %s", runtime.name, sorted(kept.versions), model_id)


def _wanted(ctx: PlatformContext, model_id: str) -> tuple[set[int], int, int | None]:
    """The versions a node serving the model must hold, the serving one, the one rolling out."""
    with ctx.session() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise WorkerStartFailed("The model was deleted.")
        return rollout.versions_to_hold(model), model.version, model.rollout_version


def _load_version(
    ctx: PlatformContext, runtime: NodeRuntime, event: BindingEvent, model_id: str, number: int, workdir: Path
) -> Evaluator:
    with ctx.session() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise WorkerStartFailed("The model was deleted.")
        blob = get_version(session, model, number).server_blob
    server_zip = ctx.store.get(BlobKind.SERVER_ZIP, blob)
    return runtime.load_evaluator(event, server_zip, workdir / f"v{number}")


def _fail(ctx: PlatformContext, runtime: NodeRuntime, event: BindingEvent, reason: str) -> None:
    with ctx.session() as session:
        finish(session, event.worker_id, WorkerStatus.FAILED, error=reason)
    serving_changed(ctx)  # it may have been the last worker a rollout waited for
    runtime.hooks.binding_load_failed(event, reason)


def _consume(ctx: PlatformContext, app: Celery, node: str, model_id: str, host_class: str, start: bool) -> None:
    """Start or stop consuming the model's queue, bound under this node's own host class, and
    this node's key-affinity queue of the model (:mod:`cipherpool.affinity_queues`), via
    control commands to this very node (handled by the consumer thread, which owns the broker
    connection). The affinity queue is registered for beat to watch before it is consumed;
    once its consumer is cancelled, what waits in it moves to the model's queue."""
    queues = [query_queue(host_class, model_id)]
    if ctx.settings.key_affinity:
        queues.append(affinity_queue_of(host_class, model_id, node))
        if start:
            affinity_queues.register(ctx.store.redis, queues[-1].name)
    for queue in queues:
        if start:
            replies = app.control.add_consumer(
                queue.name,
                exchange=queue.exchange.name,
                exchange_type=queue.exchange.type,
                routing_key=queue.routing_key,
                destination=[node],
                reply=True,
                timeout=CONTROL_REPLY_TIMEOUT_S,
            )
        else:
            replies = app.control.cancel_consumer(queue.name, destination=[node], reply=True, timeout=CONTROL_REPLY_TIMEOUT_S)
        if not replies:
            raise WorkerStartFailed(f"Node {node} did not confirm {'consuming' if start else 'leaving'} {queue.name}.")
    if not start and ctx.settings.key_affinity:
        try:
            affinity_queues.move(app, queues[-1].name)
        except Exception:  # noqa: BLE001 - beat's next look moves them (the row says this node left)
            log.warning("could not move the queries left in %s; beat will", queues[-1].name, exc_info=True)


def _workdir(ctx: PlatformContext, model_id: str) -> Path:
    base = ctx.settings.data_dir / "node-models"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=base))
