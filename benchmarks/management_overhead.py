"""What the management plane adds to each request and query at the gateway, against a real Redis.

Prints, per call (median of 5 rounds of --calls calls):
  * the change checks every request makes: a GET of its own (how 0.4.0 began), and both
    counters (credentials, serving) read in the rate limiter's round trip (what the guard
    does), against the rate count alone; and the cached serving state a token's grant gets;
  * counting a query against its token's quota (one atomic Lua call), with and without a quota;
  * reading usage for a listing of 100 tokens (one pipelined round trip).

Usage: .venv/bin/python benchmarks/management_overhead.py [--calls 5000]
Figures, not assertions: docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def per_call_us(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()

    from cipherpool.config.settings import Settings
    from cipherpool.context import PlatformContext
    from cipherpool.db import init_db
    from cipherpool.gateway.auth import Authenticator
    from cipherpool.gateway.ratelimit import RateLimiter
    from cipherpool.names import AUTH_GENERATION_KEY, SERVING_GENERATION_KEY
    from cipherpool.services import usage
    from cipherpool.services.queries import ModelGrant, TokenGrant
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.statuses import ModelStatus

    with tempfile.TemporaryDirectory(prefix="cipherpool-bench-") as tmp:
        supervisor = Supervisor(Path(tmp) / "logs")
        try:
            _child, url = start_redis(supervisor, Path(tmp) / "redis")
            ctx = PlatformContext(Settings(data_dir=Path(tmp) / "data", broker_url=url))
            redis = ctx.store.redis
            auth = Authenticator(ctx)
            limiter = RateLimiter(redis, 1e9, 1e9)  # counted, never refused
            ids = [f"{i:016x}" for i in range(100)]
            grant = TokenGrant(
                "t" * 16,
                "a" * 16,
                None,
                tuple(ModelGrant(f"m{i:015x}", f"m{i}", ModelStatus.ACTIVE, 1, "c" * 64) for i in range(3)),
            )
            init_db(ctx.db_url)  # the serving state is loaded from it once per cache TTL
            for token_id in ids:
                usage.charge(redis, token_id, None)
            figures = {
                "rate count alone (per request)": per_call_us(lambda: limiter.hit("a" * 16, "t" * 16), args.calls),
                "rate count + both change checks, one round trip": per_call_us(
                    lambda: auth.observe(
                        *limiter.hit("a" * 16, "t" * 16, also_get=(AUTH_GENERATION_KEY, SERVING_GENERATION_KEY))
                    ),
                    args.calls,
                ),
                "serving state of a grant (cached; per query)": per_call_us(lambda: auth.with_serving(grant), args.calls),
                "change check as a GET of its own": per_call_us(auth.sync, args.calls),
                "quota count, no quota (Lua per query)": per_call_us(lambda: usage.charge(redis, "a" * 16, None), args.calls),
                "quota count, with quota (Lua per query)": per_call_us(lambda: usage.charge(redis, "b" * 16, 10**12), args.calls),
                "usage of 100 tokens (listing, pipelined)": per_call_us(lambda: usage.read(redis, ids), args.calls // 50),
                "Redis PING, for scale": per_call_us(redis.ping, args.calls),
            }
        finally:
            supervisor.stop_all(grace_s=5)
    print(f"management overhead at the gateway, real Redis on loopback ({args.calls} calls x 5, median):")
    for label, us in figures.items():
        print(f"  {label:<46} {us:8.1f} µs")


if __name__ == "__main__":
    main()
