"""What the gateway's HTTP request metrics cost a request, in process (no network, no Redis).

:class:`cipherpool.gateway.httpmetrics.RequestMetricsMiddleware` times and counts every
request (a counter and a histogram per route template, method and status). Measured, as
microseconds per request (best of ``--rounds`` rounds of ``--requests`` requests each):

* ``bare``: an ASGI app that answers 200 at once (the floor), alone and wrapped by the
  middleware, for a request the router matched (``scope["route"]`` set: the usual case);
* ``unrouted``: the same wrapped app for a request no router saw (the guard refused it, or
  no route matched): the middleware matches the gateway's ~60 routes itself;
* ``gateway``: ``GET /v1/health`` through the whole gateway app (its guard and error
  handlers included), with and without the middleware;
* the refusal counter's ``add`` (a refusal counted in memory, written to Redis every second
  by another task).

Usage: .venv/bin/python benchmarks/http_metrics_overhead.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cipherpool.config.settings import Settings
from cipherpool.errors import QuotaExceeded
from cipherpool.gateway.app import create_app
from cipherpool.gateway.httpmetrics import RequestMetrics, RequestMetricsMiddleware

BODY = b'{"status":"ok"}'


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"15")]})
    await send({"type": "http.response.body", "body": BODY})


def scope_for(app: Any, path: str, route: Any = None) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"gateway")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "app": app,
    }
    if route is not None:
        scope["route"] = route
    return scope


Case = tuple[ASGIApp, Callable[[], Scope]]


async def per_request_us(cases: list[Case], requests: int, rounds: int) -> list[float]:
    """Microseconds per request of each case: the best of ``rounds``, the cases taking turns
    in each round (so that a machine busy for a while slows them all alike)."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Message) -> None:
        return None

    best = [float("inf")] * len(cases)
    for _ in range(rounds):
        for i, (app, make_scope) in enumerate(cases):
            started = time.perf_counter()
            for _ in range(requests):
                await app(make_scope(), receive, send)
            best[i] = min(best[i], time.perf_counter() - started)
    return [b / requests * 1e6 for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = args.requests, args.rounds

    settings = Settings(data_dir=Path(tempfile.mkdtemp()), broker_url="redis://127.0.0.1:1/0")
    gateway = create_app(settings)  # its route templates, for the unrouted case; nothing connects
    health = next(r for r in gateway.routes if getattr(r, "path", None) == "/v1/health")
    metrics: RequestMetrics = gateway.state.gw.requests
    wrapped = RequestMetricsMiddleware(answer, metrics)
    bare, routed, unrouted, unmatched = asyncio.run(
        per_request_us(
            [
                (answer, lambda: scope_for(gateway, "/v1/health", health)),
                (wrapped, lambda: scope_for(gateway, "/v1/health", health)),
                (wrapped, lambda: scope_for(gateway, "/v1/queries/" + "0" * 36)),  # a late template
                (wrapped, lambda: scope_for(gateway, "/no/such/path")),  # every template tried
            ],
            n,
            rounds,
        )
    )

    with_mw = create_app(settings)
    without_mw = create_app(settings)
    without_mw.user_middleware = [m for m in without_mw.user_middleware if m.cls is not RequestMetricsMiddleware]
    full_without, full_with = asyncio.run(
        per_request_us(
            [(without_mw, lambda: scope_for(without_mw, "/v1/health")), (with_mw, lambda: scope_for(with_mw, "/v1/health"))],
            max(1, n // 4),
            rounds,
        )
    )

    recorder = with_mw.state.gw.refusals
    refusal, state = QuotaExceeded("quota"), {"principal": None}
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            recorder.add(refusal, state)
        best = min(best, time.perf_counter() - started)
    add_us = best / n * 1e6

    print(f"requests per round: {n}, best of {rounds} rounds; microseconds per request")
    print(f"  bare ASGI app                          {bare:8.2f}")
    print(f"  + metrics, routed (scope has route)    {routed:8.2f}   (+{routed - bare:.2f})")
    print(f"  + metrics, unrouted (matched here)     {unrouted:8.2f}   (+{unrouted - bare:.2f})")
    print(f"  + metrics, no route matches (404)      {unmatched:8.2f}   (+{unmatched - bare:.2f})")
    print(f"  gateway GET /v1/health, no metrics     {full_without:8.2f}")
    print(f"  gateway GET /v1/health, metrics        {full_with:8.2f}   (+{full_with - full_without:.2f})")
    print(f"  refusal counted (RefusalRecorder.add)  {add_us:8.2f}")


if __name__ == "__main__":
    main()
