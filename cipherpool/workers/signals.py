"""Every Celery signal handler of cipherpool, each small and logging its own failure.

A worker is a *pool node* when it consumes ``cipherpool.pool`` (the role marker queue);
otherwise it is a control worker. Pool nodes

* run the ``threads`` pool (forced if prefork was asked for: a prefork child forked after
  an FHE run hangs, and each child would hold its own copy of hundreds of MB of keys),
* set ``OMP_NUM_THREADS`` from the node profile before concrete is ever imported,
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
from pathlib import Path
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.utils.dispatch import Signal

from cipherpool.config.profiles import resolve_profile
from cipherpool.dispatch import shared_queue_of
from cipherpool.names import BIND_TASK, POOL_QUEUE, UNBIND_TASK, node_queue
from cipherpool.services import nodes as node_service
from cipherpool.fhe.evaluator import preload
from cipherpool.workers.binding import default_evaluator_factory
from cipherpool.workers.context import platform
from cipherpool.files import private_dir
from cipherpool.workers import capacity
from cipherpool.workers.hooks import load_hook
from cipherpool.workers.loghook import WorkerLog
from cipherpool.billing.rates import profile_prices
from cipherpool.workers.querycount import QueryCounter
from cipherpool.monitoring.timings import FLUSH_S, QueryTimings
from cipherpool.workers.shared import ExecutionMeter, SharedModels
from cipherpool.workers.node import NodeRuntime, current_runtime, install_runtime

log = logging.getLogger("cipherpool.node")
_stop_heartbeat = threading.Event()
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
        ctx = platform()
        settings = ctx.settings
        profile = resolve_profile(settings)
        if settings.node_profile:  # a named profile decides the parallel executions too
            sender.concurrency = profile.concurrency
        concurrency = int(sender.concurrency or 1)
        threads = profile.threads if not settings.node_profile else profile.effective_threads(capacity.cpu_cores())
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        pool = getattr(sender.pool_cls, "__name__", str(sender.pool_cls)).lower()
        if "threads" not in pool and "solo" not in pool:
            log.warning("pool node %s: using the threads pool instead of %s", sender.hostname, pool)
            sender.pool_cls = "threads"
        redis = lambda: ctx.store.redis  # noqa: E731 - read when a hook writes, not at start
        hooks = [WorkerLog(redis), QueryCounter(redis), QueryTimings(redis, flush_s=FLUSH_S),
                 *(load_hook(path) for path in settings.node_hooks)]
        if profile.shared:
            hooks.insert(0, ExecutionMeter(lambda: ctx.store.redis, profile.name))
        runtime = install_runtime(
            NodeRuntime(
                sender.hostname,
                host_class=profile.host_class.value,
                concurrency=concurrency,
                threads=threads,
                key_cache_bytes=profile.key_cache_bytes,
                key_memory_factor=settings.key_memory_factor,
                evaluator_factory=default_evaluator_factory,
                hooks=hooks, profile=profile.name, labels=profile.labels, shared=profile.shared,
            )
        )
        if profile.shared:
            workdir = Path(settings.data_dir).expanduser() / "node-models" / f"shared-{sender.hostname}"
            shutil.rmtree(workdir, ignore_errors=True)  # what an earlier run of this node loaded
            private_dir(workdir)
            runtime.shared_models = SharedModels(sender.hostname, runtime.host_class, profile.model_cache_bytes,
                                                 workdir, default_evaluator_factory, redis=redis)
            runtime.shared_models.forget_published()
        if settings.node_preload:
            log.info("pool node %s imported concrete in %.1f s", sender.hostname, preload())
    except Exception:
        log.exception("worker_init handler failed")
        raise


@_on(signals.worker_ready)
def on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    runtime = current_runtime()
    if runtime is None:
        return
    try:
        sender.add_task_queue(node_queue(runtime.name))
        if runtime.shared_models is not None:  # a shared node takes its class's shared queries from the start
            queue = shared_queue_of(runtime.host_class)
            sender.add_task_queue(queue.name, exchange=queue.exchange.name, exchange_type=queue.exchange.type,
                                  routing_key=queue.routing_key)
        ctx = platform()
        host = capacity.detect()
        # Only a gpu node serves models compiled for the GPU; asking imports concrete.
        gpu_build = runtime.host_class == "gpu" and capacity.concrete_gpu_available()
        with ctx.session() as session:
            node_service.register_node(session, runtime.name, node_service.NodeInfo(
                host_class=runtime.host_class, concurrency=runtime.concurrency, threads=runtime.threads,
                pid=os.getpid(), profile=runtime.profile, labels=runtime.labels, shared=runtime.shared,
                host=socket.gethostname(), cores=host.cores, memory_bytes=host.memory_bytes, gpus=host.gpus,
                gpu_build=gpu_build,
                key_cache_bytes=runtime.key_cache.stats().capacity_bytes,
                prices=profile_prices(resolve_profile(ctx.settings)),
            ))
            binding = node_service.binding_of_node(session, runtime.name)
        _start_heartbeat(runtime.name, ctx.settings.node_heartbeat_s, sender.app)
        if binding is not None:
            worker, model = binding
            log.info("node %s rebinding to model %s after restart", runtime.name, model.name)
            sender.app.send_task(BIND_TASK, kwargs={"worker_id": worker.id}, queue=node_queue(runtime.name))
    except Exception:
        log.exception("worker_ready handler failed")


@_on(signals.worker_shutdown)
def on_worker_shutdown(sender: Any = None, **_kwargs: Any) -> None:
    runtime = current_runtime()
    if runtime is None:
        return
    _stop_heartbeat.set()
    if runtime.shared_models is not None:
        runtime.shared_models.forget_published()
    try:
        with platform().session() as session:
            node_service.node_offline(session, runtime.name)
    except Exception:
        log.exception("worker_shutdown handler failed")


def _start_heartbeat(name: str, interval_s: float, app: Any) -> None:
    """Beat every ``interval_s``; and reconcile: a binding whose worker the database no longer
    wants (stopped by an operator without a broker at hand, or an unbind message lost) is
    unbound by the node itself."""
    def beat() -> None:
        while not _stop_heartbeat.wait(interval_s):
            try:
                runtime = current_runtime()
                binding = runtime.binding if runtime else None
                with platform().session() as session:
                    node_service.heartbeat(session, name)
                    unwanted = binding is not None and not node_service.still_wanted(session, binding.worker_id)
                if binding is not None and unwanted:
                    log.info("node %s: worker %s is no longer wanted; unbinding", name, binding.worker_id)
                    app.send_task(UNBIND_TASK, kwargs={"worker_id": binding.worker_id}, queue=node_queue(name))
            except Exception:
                log.exception("heartbeat of %s failed", name)

    threading.Thread(target=beat, name="cipherpool-heartbeat", daemon=True).start()
