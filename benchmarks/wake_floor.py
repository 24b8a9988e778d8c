"""The machine's floor under a query's path: what one hop between processes or threads costs
when the one woken has been idle, as it is between the queries of a slow model (issue 27).

A query crosses, one way each: client -> gateway (HTTP), gateway -> Redis (the admission
script), Redis -> node (its BRPOP), the node's consumer thread -> its pool thread, node ->
Redis (the answer), Redis -> gateway (the answer's message), gateway -> client; and the
gateway's thread-pool hop and back. Back to back, on a hot machine, each hop costs tens of
microseconds; after a pause, each woken process or thread pays the scheduler's (and on a
virtual machine the hypervisor's) wake-up. This prints, after idle gaps of 0 to 200 ms:

* a Redis round trip from a client (PING: two hops, no work);
* a PUBLISH heard by a subscriber on an asyncio loop, as the gateway hears an answer (one
  hop through Redis: the publisher's command and the subscriber's wake);
* a round trip to a thread pool from an asyncio loop (two thread wake-ups), as the gateway's
  publish and a node's hand-over make.

These are single hops; `hop_chain.py` times the whole path made with the least Python (the
floor of "end to end less compute" for a model that computes for seconds, as digits does).

Usage: .venv/bin/python benchmarks/wake_floor.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis

GAPS_S = (0.0, 0.001, 0.02, 0.2)  # --gaps adds others (2 s: a digits query's compute)


async def timed(rounds: int, gap: float, once: Callable[[], Awaitable[float]]) -> float:
    """Median seconds of ``once`` after each idle gap (the loop asleep, every thread idle)."""
    spent = []
    for _ in range(rounds):
        if gap:
            await asyncio.sleep(gap)
        spent.append(await once())
    return statistics.median(spent)


async def measure(url: str, rounds: int, gaps: tuple[float, ...] = GAPS_S) -> None:
    sync = redis.Redis.from_url(url)
    publisher = redis.Redis.from_url(url)
    client = aioredis.Redis.from_url(url)

    async def as_received(message: object) -> object:
        return message

    subscriber = client.pubsub(push_handler_func=as_received)
    await subscriber.subscribe("wake-floor")
    await subscriber.get_message(timeout=1)
    loop = asyncio.get_running_loop()

    def ping_inside() -> float:
        t = time.perf_counter()
        sync.ping()
        return time.perf_counter() - t

    async def redis_round_trip() -> float:
        return await loop.run_in_executor(None, ping_inside)

    async def published() -> float:
        sent = [0.0]

        def send() -> None:
            sent[0] = time.perf_counter()
            publisher.publish("wake-floor", b"x" * 100)

        threading.Thread(target=send).start()
        while True:
            message = await subscriber.get_message(timeout=2)
            if message is not None and message["type"] == "message":
                return time.perf_counter() - sent[0]

    async def thread_hop() -> float:
        t = time.perf_counter()
        await loop.run_in_executor(None, int)
        return time.perf_counter() - t

    print(f"{'idle gap':>10}  {'Redis round trip':>17}  {'PUBLISH heard':>14}  {'thread-pool round trip':>23}")
    for gap in gaps:
        trip = await timed(rounds, gap, redis_round_trip)
        heard = await timed(rounds, gap, published)
        hop = await timed(rounds, gap, thread_hop)
        print(f"{gap * 1e3:8.0f} ms  {trip * 1e3:14.3f} ms  {heard * 1e3:11.3f} ms  {hop * 1e3:20.3f} ms", flush=True)
    await subscriber.aclose()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--gaps", default=",".join(str(g) for g in GAPS_S), help="idle gaps, seconds, comma-separated")
    args = parser.parse_args()
    gaps = tuple(float(g) for g in args.gaps.split(","))
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    root = Path(tempfile.mkdtemp(prefix="wake-floor-"))
    supervisor = Supervisor(root / "logs")
    try:
        _child, url = start_redis(supervisor, root / "redis")
        asyncio.run(measure(url, args.rounds, gaps))
    finally:
        supervisor.stop_all(grace_s=5)


if __name__ == "__main__":
    main()
