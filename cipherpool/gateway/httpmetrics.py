"""The gateway's HTTP requests, counted in this process for the operator's Prometheus
(``GET /metrics`` renders them beside the platform's figures):

* ``cipherpool_http_requests_total{route, method, status}``: requests answered;
* ``cipherpool_http_request_duration_seconds{route, method}``: a histogram of the time from
  the request's arrival at the gateway's outermost layer to the last byte of its answer
  handed to the server (a long poll's wait included: ``GET /v1/queries/{query_id}`` with
  ``?wait=`` takes as long as it waits).

Labels are bounded whatever clients send: ``route`` is the matched route's template
(``/v1/queries/{query_id}``, never the raw path: no ids, no query string), ``unmatched`` for
a path no route has; a request the guard refused before routing (401, 429, 413) is matched
here against the templates the app was built with (:meth:`RequestMetrics.learn`: compiled
once; FastAPI's own router matching costs some hundreds of microseconds a request), so it
still counts under its route. ``method`` is one of
:data:`METHODS` or ``OTHER``; ``status`` is the status answered (``500`` when none was: the
app failed before answering). Routes are the gateway's own (about 60), statuses the few it
answers: some hundreds of series per process.

These are this process's own: they start at zero with it (``rate()`` takes that as a counter
reset), and each gateway process counts its requests only, so scrape every gateway process
(not through the load balancer) and add them up: ``sum without (instance)``. The middleware
is pure ASGI and runs outermost, around the guard; its cost per request is measured in
``benchmarks/http_metrics_overhead.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
# Seconds: from a cached health check's fraction of a millisecond to a long poll's minute.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def route_path(scope: Scope) -> str:
    """The request's path as the routes see it: behind a path prefix (``--root-path``, set by a
    proxy), uvicorn puts the prefix in ``path`` too, and the routes match what follows it."""
    root, raw = scope.get("root_path", ""), scope["path"]
    return str(raw[len(root) :] or "/") if root and raw.startswith(root) else str(raw)


class RequestMetrics:
    """The two families, in a registry of this gateway's own (never prometheus-client's global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cipherpool_http_requests",
            "HTTP requests this gateway process answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "cipherpool_http_request_duration_seconds",
            "Time this gateway process took to answer a request (long polls included), by route template and method.",
            ("route", "method"),
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._templates: list[tuple[re.Pattern[str], str]] = []

    def learn(self, templates: Iterable[str]) -> None:
        """The app's route templates, in its routing order (for requests refused before routing)."""
        self._templates = [(compile_path(template)[0], template) for template in templates]

    def template_of(self, path: str) -> str:
        """The first learned template that matches ``path`` (``unmatched`` if none does)."""
        for pattern, template in self._templates:
            if pattern.match(path):
                return template
        return UNMATCHED

    def route_of(self, scope: Scope) -> str:
        """The template of the route that answered (or would have answered) the request."""
        path = getattr(scope.get("route"), "path_format", None)
        if isinstance(path, str):
            return path
        if "router" in scope:  # the router saw it and no route matched
            return UNMATCHED
        return self.template_of(route_path(scope))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # labels() looks up under a lock: once per combination
            children = (self.requests.labels(route, method, str(status)), self.duration.labels(route, method))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class RequestMetricsMiddleware:
    """Times and counts every HTTP request, whoever answers it (guard, route or error handler)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.observe(self.metrics.route_of(scope), method, status, time.perf_counter() - started)
