"""What the hook layer costs a query on a node, in process (no broker, no FHE).

Runs the node's whole query path (:func:`cipherpool.workers.query.handle`: decode, checks,
cached key, a fake evaluator, reply) many times with:
  * no hooks at all (the floor),
  * only the built-in statistics hook (what every node runs),
  * the statistics hook plus N no-op hooks (what plugging in metrics, billing and alerts adds),
and prints microseconds per query, so the cost of a hook is a figure, not a guess. For scale:
the cheapest real model here (breast-cancer logistic regression) computes for 6-30 ms, and
the digits MLP for about 1.8 s.

Usage: .venv/bin/python benchmarks/hook_overhead.py [--queries 20000] [--hooks 5]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from typing import Any

from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.fhe.values import build_value
from cipherpool.messages import EncryptedInput, QueryRequest
from cipherpool.names import model_queue
from cipherpool.store import BlobKind, sha256_hex
from cipherpool.workers.hooks import BindingEvent, Hook, Hooks
from cipherpool.workers.node import Binding, NodeRuntime
from cipherpool.workers.query import Delivery, handle
from cipherpool.workers.timings import FLUSH_S, QueryTimings

MODEL, KEY_ID = "m" * 16, "a" * 32


class _Store:
    def __init__(self, key: bytes):
        self.blob_id = sha256_hex(key)
        self.key = key

    def get(self, kind: BlobKind, blob_id: str) -> bytes:
        return self.key


class _Ctx(PlatformContext):
    def __init__(self, settings: Settings, store: Any):
        super().__init__(settings)
        self.__dict__["store"] = store


def _capnp(words: int) -> bytes:
    return struct.pack("<II", 0, words) + b"\x07" * (8 * words)


def per_query_us(extra_hooks: int, queries: int, stats: bool = True, redis: Any = None) -> float:
    store = _Store(_capnp(4))
    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "bench",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
        hooks=[Hook() for _ in range(extra_hooks)],
    )
    if not stats:
        runtime.hooks = Hooks([])  # no hook at all: the floor of the path
    if redis is not None:  # the query-time recorder every node runs (one pipelined round trip)
        runtime.hooks.add(QueryTimings(lambda: redis, flush_s=FLUSH_S))
    event = BindingEvent("bench", "w1", MODEL, "m")
    runtime.load_evaluator(event, b"", None)  # type: ignore[arg-type]  # the fake ignores its workdir
    runtime.set_binding(Binding("w1", MODEL, "m", model_queue("cpu", MODEL), evaluator, "bench"))
    ctx = _Ctx(Settings(), store)
    raw = QueryRequest(
        token_id="t",
        model_id=MODEL,
        key_id=KEY_ID,
        blob_id=store.blob_id,
        input=EncryptedInput(MODEL, KEY_ID, build_value()).encode(),
        submitted_at=time.time(),
    ).encode()
    delivery = Delivery("q", model_queue("cpu", MODEL), "2099-01-01T00:00:00")
    for _ in range(min(1000, queries)):  # warm up
        handle(ctx, runtime, raw, delivery)
    started = time.perf_counter()
    for _ in range(queries):
        handle(ctx, runtime, raw, delivery)
    return (time.perf_counter() - started) / queries * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--hooks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis", help="Redis URL for the query-time recorder (default: start one on loopback).")
    args = parser.parse_args()
    timed = _with_redis(args.redis, lambda redis: [per_query_us(0, args.queries // 4, redis=redis) for _ in range(args.repeats)])
    bare = [per_query_us(0, args.queries, stats=False) for _ in range(args.repeats)]
    base = [per_query_us(0, args.queries) for _ in range(args.repeats)]
    more = [per_query_us(args.hooks, args.queries) for _ in range(args.repeats)]
    n, b, m = statistics.median(bare), statistics.median(base), statistics.median(more)
    print(f"node query path, fake evaluator, {args.queries} queries x {args.repeats} repeats (median):")
    print(f"  no hooks at all                      {n:8.1f} us/query")
    print(f"  statistics hook only                 {b:8.1f} us/query")
    print(f"  + {args.hooks} no-op hooks                     {m:8.1f} us/query   (+{(m - b) / args.hooks:.2f} us per hook)")
    t = statistics.median(timed)
    print(f"  + query-time recorder (loopback Redis) {t:8.1f} us/query   (+{t - b:.1f} us)")


def _with_redis(url: str | None, run: Any) -> Any:
    """Run ``run(redis)`` against ``url``, or against a Redis started here and stopped after."""
    import tempfile
    from pathlib import Path

    from redis import Redis

    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    if url:
        return run(Redis.from_url(url))
    with tempfile.TemporaryDirectory() as tmp:
        supervisor = Supervisor(Path(tmp) / "logs")
        try:
            _child, started = start_redis(supervisor, Path(tmp) / "redis", maxmemory_bytes=256 * 1024**2)
            return run(Redis.from_url(started))
        finally:
            supervisor.stop_all(grace_s=5)


if __name__ == "__main__":
    main()
