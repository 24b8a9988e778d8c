"""Every Celery signal handler of cipherpool, each small and logging its own failure.

A worker is a *pool node* when it consumes ``cipherpool.pool`` (the role marker queue);
otherwise it is a control worker. Pool nodes

* run the ``threads`` pool (forced if prefork was asked for: a prefork child forked after
  an FHE run hangs, and each child would hold its own copy of hundreds of MB of keys),
* set ``OMP_NUM_THREADS`` from the node profile, and OpenMP's idle spin, before concrete
  is ever imported (cipherpool/fhe/threads.py),
* register in the database when ready, consume their own node queue, heartbeat, and rebind
  the model the database says they serve (bindings survive a node restart),
* are marked offline on shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import signals
from celery.utils.dispatch import Signal

from cipherpool import backends, workerlog
from cipherpool.billing.rates import profile_prices
from cipherpool.blobs import DiskCache, node_cache_dir
from cipherpool.config.profiles import resolve_profile
from cipherpool.context import platform
from cipherpool.dispatch import shared_queue_of
from cipherpool.fhe.evaluator import evaluator_factory, preload
from cipherpool.fhe.process import block_sigpipe
from cipherpool.fhe.threads import openmp_env
from cipherpool.files import private_dir
from cipherpool.names import BIND_TASK, POOL_QUEUE, UNBIND_TASK, node_queue
from cipherpool.services import nodes as node_service
from cipherpool.waiting import Backoff, StateLog
from cipherpool.workers import capacity
from cipherpool.workers.afteranswer import AfterAnswer
from cipherpool.workers.hooks import load_hook
from cipherpool.workers.loghook import WorkerLog
from cipherpool.workers.node import NodeRuntime, current_runtime, install_runtime
from cipherpool.workers.querycount import QueryCounter
from cipherpool.workers.shared import ExecutionMeter, SharedModels
from cipherpool.workers.timings import FLUSH_S, QueryTimings

log = logging.getLogger("cipherpool.node")
_stop_heartbeat = threading.Event()
_registration: threading.Thread | None = None  # the thread that registers and heartbeats (pool nodes)
REGISTRATION_JOIN_S = 10.0
Handler = Callable[..., None]


def _on(signal: Signal) -> Callable[[Handler], Handler]:
    """``@signal.connect``, typed (Celery ships no types): connects the handler, returns it."""

    def connect(handler: Handler) -> Handler:
        signal.connect(handler)
        return handler

    return connect


@_on(signals.worker_init)
def on_worker_init(sender: Any = None, **_kwargs: Any) -> None:
    try:
        queues = set(sender.app.amqp.queues.consume_from or {})
        if POOL_QUEUE not in queues:
            return
        block_sigpipe()  # before any execution thread exists: they inherit it (cipherpool/fhe/process.py)
        ctx = platform()
        settings = ctx.settings
        profile = resolve_profile(settings)
        if settings.node_profile:  # a named profile decides the parallel executions too
            sender.concurrency = profile.concurrency
        concurrency = int(sender.concurrency or 1)
        threads = profile.threads if not settings.node_profile else profile.effective_threads(capacity.cpu_cores())
        os.environ.update(openmp_env(threads, settings.node_spin_ms))
        pool = getattr(sender.pool_cls, "__name__", str(sender.pool_cls)).lower()
        if "threads" not in pool and "solo" not in pool:
            log.warning("pool node %s: using the threads pool instead of %s", sender.hostname, pool)
            sender.pool_cls = "threads"
        redis = lambda: ctx.store.redis  # noqa: E731 - read when a hook writes, not at start
        after_answer = AfterAnswer(redis)  # sent at task_postrun (on_task_postrun)
        hooks = [
            WorkerLog(redis),
            QueryCounter(redis, after_answer),
            QueryTimings(redis, flush_s=FLUSH_S),
            *(load_hook(path) for path in settings.node_hooks),
        ]
        if profile.shared:
            hooks.insert(0, ExecutionMeter(lambda: ctx.counters, profile.name))  # billed: never counted twice
        runtime = install_runtime(
            NodeRuntime(
                sender.hostname,
                host_class=profile.host_class,
                concurrency=concurrency,
                threads=threads,
                key_cache_bytes=profile.key_cache_bytes,
                key_memory_factor=settings.key_memory_factor,
                evaluator_factory=evaluator_factory(profile.host_class),
                hooks=hooks,
                profile=profile.name,
                labels=profile.labels,
                shared=profile.shared,
            )
        )
        runtime.after_answer = after_answer
        cache_bytes = settings.effective_node_blob_cache_bytes()
        if cache_bytes:  # keys and server zips kept on this node's disk (cipherpool.blobs.cache)
            runtime.blob_cache = DiskCache(node_cache_dir(settings, sender.hostname), cache_bytes)
            ctx.store.attach_cache(runtime.blob_cache)
        if profile.shared:
            workdir = Path(settings.data_dir).expanduser() / "node-models" / f"shared-{sender.hostname}"
            shutil.rmtree(workdir, ignore_errors=True)  # what an earlier run of this node loaded
            private_dir(workdir)
            runtime.shared_models = SharedModels(
                sender.hostname, runtime.host_class, profile.model_cache_bytes, workdir, runtime.evaluator_factory, redis=redis
            )
            runtime.shared_models.forget_published()
        if settings.node_preload:
            log.info("pool node %s imported concrete in %.1f s", sender.hostname, preload())
    except Exception:
        log.exception("worker_init handler failed")
        raise


@_on(signals.task_postrun)
def on_task_postrun(**_kwargs: Any) -> None:
    """After a task's result is stored and published: the writes its answer did not wait for."""
    runtime = current_runtime()
    if runtime is not None and runtime.after_answer is not None:
        runtime.after_answer.send()


@_on(signals.worker_ready)
def on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    runtime = current_runtime()
    if runtime is None:
        return
    try:
        sender.add_task_queue(node_queue(runtime.name))
        if runtime.shared_models is not None:  # a shared node takes its class's shared queries from the start
            queue = shared_queue_of(runtime.host_class)
            sender.add_task_queue(
                queue.name, exchange=queue.exchange.name, exchange_type=queue.exchange.type, routing_key=queue.routing_key
            )
        ctx = platform()
        host = capacity.detect()
        # The backends this node can run; only its class's are probed (a probe may import concrete).
        capabilities = backends.probe(runtime.host_class)
        info = node_service.NodeInfo(
            host_class=runtime.host_class,
            concurrency=runtime.concurrency,
            threads=runtime.threads,
            pid=os.getpid(),
            profile=runtime.profile,
            labels=runtime.labels,
            shared=runtime.shared,
            host=socket.gethostname(),
            cores=host.cores,
            memory_bytes=host.memory_bytes,
            gpus=host.gpus,
            capabilities=capabilities,
            key_cache_bytes=runtime.key_cache.stats().capacity_bytes,
            prices=profile_prices(resolve_profile(ctx.settings)),
        )
    except Exception:
        log.exception("worker_ready handler failed")
        return
    global _registration
    _stop_heartbeat.clear()
    _registration = threading.Thread(
        target=_keep_registered,
        name="cipherpool-heartbeat",
        daemon=True,
        args=(runtime.name, info, ctx.settings.node_heartbeat_s, sender.app),
    )
    _registration.start()


@_on(signals.worker_shutdown)
def on_worker_shutdown(sender: Any = None, **_kwargs: Any) -> None:
    runtime = current_runtime()
    if runtime is None:
        return
    _stop_heartbeat.set()
    if _registration is not None:  # a registration or heartbeat in flight must not land after the offline mark
        _registration.join(timeout=REGISTRATION_JOIN_S)
    if runtime.shared_models is not None:
        runtime.shared_models.forget_published()
    try:
        with platform().session() as session:
            node_service.node_offline(session, runtime.name)
    except Exception:
        log.exception("worker_shutdown handler failed")


def _keep_registered(name: str, info: node_service.NodeInfo, interval_s: float, app: Any) -> None:
    """The node's registration, for as long as the process runs: register (and rebind what the
    database says this node serves), then heartbeat every ``interval_s``.

    Nodes start in any order with the rest of the platform: a database that is unreachable, or
    not migrated yet, is waited for with backoff (:class:`Backoff`, logged once per change of
    state), and a registration that was lost (the row is gone: a database restored, a schema
    made after the node started) is made again. Once registered, a failed heartbeat is tried
    again within one interval, never later: a node that is slow to be heard after a database
    outage looks lost. A rebind that could not be sent (the broker away) is sent again at the
    next beat, without registering again (which would count the time since as downtime).
    While registered, the heartbeat also reconciles: a binding whose worker the database no
    longer wants (stopped by an operator without a broker at hand, or an unbind message lost)
    is unbound by the node itself."""
    state = StateLog(log, f"pool node {name}: registration")
    backoff = Backoff(first_s=min(1.0, interval_s), max_s=max(interval_s, 30.0))
    registered = False
    rebind: str | None = None  # a worker to rebind, not yet told to this node's queue
    while not _stop_heartbeat.is_set():
        pause = interval_s
        try:
            if not registered:
                rebind = _register(name, info)
                registered = True
                state.recovered("registered")
            elif not _heartbeat(name, app):
                log.warning("pool node %s: its registration is gone from the database; registering again", name)
                registered, rebind, pause = False, None, 0.0
            if rebind is not None:
                log.info("node %s rebinding worker %s after restart", name, rebind)
                app.send_task(BIND_TASK, kwargs={"worker_id": rebind}, queue=node_queue(name))
                rebind = None
            backoff.reset()
        except Exception as exc:  # noqa: BLE001 - the database or the broker is down: wait, then try again
            state.failed(exc)
            pause = backoff.next() if not registered else min(interval_s, backoff.next())
        _stop_heartbeat.wait(pause)


def _register(name: str, info: node_service.NodeInfo) -> str | None:
    """Record this node as online (committed); the worker it must rebind, if the database says
    it serves one that this process does not hold yet (a node that restarts keeps its binding)."""
    ctx = platform()
    with ctx.session() as session:
        registered = node_service.register(session, name, info)
        binding = node_service.binding_of_node(session, name)
    if registered.downtime is not None:  # committed: the worker's log says what its events say
        try:
            workerlog.write(
                ctx.store.redis, registered.downtime.worker_id, registered.downtime.describe(), level="warning", source=name
            )
        except Exception:  # noqa: BLE001 - the log line is best effort; the event is recorded
            log.warning("node %s: could not write the downtime to worker %s's log", name, registered.downtime.worker_id)
    runtime = current_runtime()
    held = runtime.binding if runtime else None
    if binding is not None and (held is None or held.worker_id != binding[0].id):
        return binding[0].id
    return None


def _heartbeat(name: str, app: Any) -> bool:
    """One heartbeat; False if this node's row is gone (it must register again)."""
    runtime = current_runtime()
    binding = runtime.binding if runtime else None
    with platform().session() as session:
        if not node_service.heartbeat(session, name):
            return False
        unwanted = binding is not None and not node_service.still_wanted(session, binding.worker_id)
    if binding is not None and unwanted:
        log.info("node %s: worker %s is no longer wanted; unbinding", name, binding.worker_id)
        app.send_task(UNBIND_TASK, kwargs={"worker_id": binding.worker_id}, queue=node_queue(name))
    return True
