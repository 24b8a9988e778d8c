"""A query's own routes taken past FastAPI's per-request work, when their parameters are plain.

FastAPI answers a route by building its dependencies and validating each query parameter with
pydantic, for every request: on ``POST /v1/queries`` that was 0.3 ms of the gateway's time per
query before the route's first line (0.17 ms in ``solve_dependencies`` alone, for three
parameters), of about 1.3 ms from the request's bytes to the query's publish (a traced digits
query, docs/performance.md).

:class:`QueryLanes` wraps the app's router (Starlette's router-level middleware: inside the
app's exception middleware, so an exception takes the same handlers either way). A request
to a query route whose method, path and query string it reads with certainty
(:func:`submit_params`, :func:`result_params`: the parameters the client sends, in the forms it
sends them) goes straight to the route's endpoint function, called as FastAPI would call it.
Anything else (another route, an unknown or repeated parameter, a form pydantic might read
differently, a value out of range, a query id that is not one) goes to the router untouched,
and FastAPI answers it as it always did, its 422s included. So the lane changes no answer,
only how soon a plain one comes. The routes stay FastAPI's in the OpenAPI document.

The endpoints must take no dependency of FastAPI's (they read the guard's principal with
:func:`cipherpool.gateway.deps.caller`), and the app none either: ``create_app`` installs the
lanes only then, and a test holds the endpoints' signatures to what the lanes pass.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_args

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cipherpool.api.schemas import QUERY_ID_PATTERN
from cipherpool.gateway import queries
from cipherpool.gateway.httpmetrics import route_path
from cipherpool.services.queries import Route as Mode

# The routes' own bounds, read from their declarations so that the lane never drifts from them.
MAX_WAIT_S = float(next(rule.le for rule in get_args(queries.Wait)[1].metadata if hasattr(rule, "le")))
_RESULT_PATH = re.compile("/v1/queries/(" + QUERY_ID_PATTERN.removeprefix("^").removesuffix("$") + ")")
# A wait in the forms a client writes (Python's str of a float, an int); anything else is FastAPI's.
_SECONDS = re.compile(rb"[0-9]{1,3}(\.[0-9]{1,17})?")
_BOOLEANS = {b"true": True, b"false": False, b"1": True, b"0": False}
_MODES = {mode.value.encode(): mode for mode in Mode}
_SUBMIT = frozenset({b"wait", b"wait_for_worker", b"mode"})
_RESULT = frozenset({b"wait"})
Params = dict[str, Any]


def _pairs(query_string: bytes, known: frozenset[bytes]) -> dict[bytes, bytes] | None:
    """Each parameter's raw value; None where one is unknown, repeated or encoded."""
    found: dict[bytes, bytes] = {}
    if not query_string:
        return found
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        if name not in known or name in found or b"%" in value or b"+" in value:
            return None
        found[name] = value
    return found


def _wait(raw: bytes | None) -> float | None:
    if raw is None:
        return 0.0
    if not _SECONDS.fullmatch(raw):
        return None
    seconds = float(raw)
    return seconds if seconds <= MAX_WAIT_S else None


def submit_params(query_string: bytes) -> Params | None:
    """``POST /v1/queries``' parameters as its endpoint takes them, or None: FastAPI's to read."""
    pairs = _pairs(query_string, _SUBMIT)
    if pairs is None:
        return None
    wait = _wait(pairs.get(b"wait"))
    waiting = _BOOLEANS.get(pairs.get(b"wait_for_worker", b"false"))
    mode = _MODES.get(pairs.get(b"mode", b"auto"))
    if wait is None or waiting is None or mode is None:
        return None
    return {"wait": wait, "wait_for_worker": waiting, "mode": mode}


def result_params(query_string: bytes) -> Params | None:
    """``GET /v1/queries/{query_id}``'s query parameters as its endpoint takes them, or None."""
    pairs = _pairs(query_string, _RESULT)
    wait = None if pairs is None else _wait(pairs.get(b"wait"))
    return None if wait is None else {"wait": wait}


@dataclass(frozen=True)
class _Lane:
    endpoint: Callable[..., Awaitable[Response]]
    params: Params
    route: Route  # what the request metrics label it by (its template), as FastAPI's match would


class QueryLanes:
    """The router's middleware: a plain query request to its endpoint, anything else onward."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._submit = Route("/v1/queries", queries.submit, methods=["POST"])
        self._result = Route("/v1/queries/{query_id}", queries.result, methods=["GET"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self._lane(scope) if scope["type"] == "http" else None
        if lane is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = lane.route
        response = await lane.endpoint(Request(scope, receive, send), **lane.params)
        await response(scope, receive, send)

    def _lane(self, scope: Scope) -> _Lane | None:
        method, path = scope["method"], route_path(scope)
        if method == "POST" and path == "/v1/queries":
            params = submit_params(scope.get("query_string", b""))
            return None if params is None else _Lane(queries.submit, params, self._submit)
        if method == "GET" and (found := _RESULT_PATH.fullmatch(path)):
            params = result_params(scope.get("query_string", b""))
            if params is None:
                return None
            scope["path_params"] = {"query_id": found[1]}
            return _Lane(queries.result, {**params, "query_id": found[1]}, self._result)
        return None
