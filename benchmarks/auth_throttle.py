"""What a refused authentication costs the gateway, throttled and not (docs/operations.md,
"Security and tenancy").

Runs the gateway app in process (Starlette's TestClient: the ASGI app, its middleware and
routes, no network; the client stands behind a trusted proxy, each source named in
X-Forwarded-For) on an embedded Redis and a SQLite database, and times N requests of each:

  * ``GET /v1/health``: public, no credential (the floor: the framework and the test client);
  * a cached valid API key (``GET /v1/account``): no database lookup, the rate counted in Redis;
  * a wrong API key from a source under its burst: 401 after a database lookup (and a
    failure counted in Redis);
  * a wrong API key from a throttled source: 429 after one Redis read, no lookup;
  * a wrong metrics token on ``/metrics`` from a throttled source: 429.

Then the guard's admission alone (``Guard._admit``: the credential, the throttle, the rate),
without HTTP, for the same credentials. It prints microseconds per request (the median of
``--repeats`` runs) and how many database lookups each kind made (counted by wrapping the
lookup functions), so that "a throttled source costs no lookup" is a figure.

Usage: .venv/bin/python benchmarks/auth_throttle.py [--requests 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    import cipherpool.gateway.auth as auth
    from cipherpool.config.settings import Settings
    from cipherpool.db import init_db, session_scope
    from cipherpool.gateway.app import create_app
    from cipherpool.services import accounts
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    lookups = [0]
    real_key, real_grant = auth.authenticate_api_key, auth.grant_for_value

    def key(session: Any, value: str) -> Any:
        lookups[0] += 1
        return real_key(session, value)

    def grant(session: Any, value: str) -> Any:
        lookups[0] += 1
        return real_grant(session, value)

    auth.authenticate_api_key, auth.grant_for_value = key, grant  # type: ignore[assignment]

    with tempfile.TemporaryDirectory(prefix="auth-throttle-") as tmp:
        root = Path(tmp)
        supervisor = Supervisor(root / "logs")
        try:
            _child, url = start_redis(supervisor, root / "redis")
            settings = Settings(
                data_dir=root / "data",
                broker_url=url,
                token_rate_per_s=0,
                account_rate_per_s=0,
                metrics_token="m" * 32,
                auth_failure_burst=20,
                auth_failure_window_s=3600,
                trusted_proxies=["10.0.0.1"],
            )
            init_db(settings.effective_database_url())
            with session_scope(settings.effective_database_url()) as session:
                _account, api_key = accounts.create_account(session, "bench")
            app = create_app(settings)
            # One client behind a trusted proxy; each source is named in X-Forwarded-For.
            first, second = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
            bearer = {"Authorization": f"Bearer {api_key}", **first}
            wrong = {"Authorization": "Bearer cpk_" + "x" * 40}
            with TestClient(app, client=("10.0.0.1", 1)) as client:
                for _ in range(settings.auth_failure_burst):
                    assert client.get("/v1/account", headers={**wrong, **second}).status_code == 401
                assert client.get("/v1/account", headers={**wrong, **second}).status_code == 429
                redis = app.state.gw.store.redis

                def under_burst() -> int:
                    # The same source each time, its failures cleared between requests: every
                    # request is a first failure (a lookup, a failure counted).
                    for k in redis.scan_iter(match="cipherpool:auth-fail:198.51.100.1:*"):
                        redis.delete(k)
                    return client.get("/v1/account", headers={**wrong, **first}).status_code

                kinds: list[tuple[str, Callable[[], int], int]] = [
                    ("GET /v1/health (public: the floor)", lambda: client.get("/v1/health").status_code, 200),
                    ("a cached valid API key", lambda: client.get("/v1/account", headers=bearer).status_code, 200),
                    ("a wrong API key, under the burst (401)", under_burst, 401),
                    (
                        "a wrong API key, throttled (429)",
                        lambda: client.get("/v1/account", headers={**wrong, **second}).status_code,
                        429,
                    ),
                    (
                        "a wrong metrics token, throttled (429)",
                        lambda: client.get("/metrics", headers={"Authorization": "Bearer wrong", **second}).status_code,
                        429,
                    ),
                ]
                print(f"gateway in process (TestClient), {args.requests} requests x {args.repeats} repeats (median):")
                for name, call, status in kinds:
                    call()  # warm: caches, connections
                    runs = []
                    before = lookups[0]
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        for _ in range(args.requests):
                            assert call() == status, name
                        runs.append((time.perf_counter() - started) / args.requests * 1e6)
                    made = lookups[0] - before
                    print(
                        f"  {name:<42} {statistics.median(runs):8.0f} us/request   "
                        f"database lookups: {made} of {args.requests * args.repeats}"
                    )

                # The guard's admission alone (what a request costs before any route runs), in
                # this thread: no HTTP client, no event loop.
                from cipherpool.errors import CipherpoolError
                from cipherpool.gateway.guard import Guard

                gw = app.state.gw

                def admit(header: str, source: str) -> str:
                    try:
                        Guard._admit(gw, header, source)
                    except CipherpoolError as exc:
                        return exc.code
                    return "ok"

                def admit_under_burst() -> str:
                    redis.delete(*redis.keys("cipherpool:auth-fail:198.51.100.1:*") or ["-"])
                    return admit(wrong["Authorization"], "198.51.100.1")

                guard_kinds: list[tuple[str, Callable[[], str], str]] = [
                    ("a cached valid API key", lambda: admit(bearer["Authorization"], "198.51.100.1"), "ok"),
                    ("a wrong API key, under the burst", admit_under_burst, "invalid_api_key"),
                    ("a wrong API key, throttled", lambda: admit(wrong["Authorization"], "198.51.100.2"), "rate_limited"),
                ]
                print(f"the guard's admission alone, {args.requests} x {args.repeats} (median):")
                for name, call, code in guard_kinds:
                    call()
                    runs = []
                    before = lookups[0]
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        for _ in range(args.requests):
                            assert call() == code, name
                        runs.append((time.perf_counter() - started) / args.requests * 1e6)
                    print(
                        f"  {name:<42} {statistics.median(runs):8.0f} us/request   "
                        f"database lookups: {lookups[0] - before} of {args.requests * args.repeats}"
                    )
        finally:
            supervisor.stop_all(grace_s=5)


if __name__ == "__main__":
    main()
