"""Authentication, rate limits and body caps, before any route reads a byte of the body.

A pure ASGI middleware, because FastAPI parses a declared body before it runs a route's
dependencies: a zip bomb sent with a wrong key must cost nothing, and an oversize body must
be refused before it is stored. Order for every request but the public ones:

0. a request with more than one ``Authorization`` header is refused (400 ``bad_request``), on
   every path, public and self-authenticated ones included: which header counts must never
   depend on who reads it;
1. the bearer credential is authenticated (cached; see :mod:`cipherpool.gateway.auth`); a
   source address that failed too often is refused first (429, without a lookup), and a
   failure is counted against it (:mod:`cipherpool.gateway.throttle`). A cached credential
   is admitted on the event loop (steps 1 and 2), without a thread-pool hop;
2. the principal's request rate is counted (429 with ``Retry-After`` when over);
3. a declared ``Content-Length`` above the route's cap is refused (413) at once, and a
   streamed body is cut off with 413 the moment it passes the cap.

The self-authenticated paths (the metrics token's) are throttled the same way: a source over
its failures is refused before the route runs, and each 401 they answer counts.

The principal is left in ``scope["state"]["principal"]`` for the routes. Each refusal the
guard answers is counted (:mod:`cipherpool.gateway.refusals`), for the tenant once it is known:
a rate refusal comes after authentication, so it counts for the principal that was refused.

This runs outside FastAPI's exception handlers: a dependency's outage met here (the database
while authenticating, Redis while counting) is answered here, as the typed 503 it stands for
(:func:`~cipherpool.outages.logged_outage`), not as the server's generic error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cipherpool.errors import AuthError, BadRequest, CipherpoolError, PayloadTooLarge
from cipherpool.gateway.admission import LOOP_MAX_BYTES, PENDING, PendingCount
from cipherpool.gateway.admit import authenticate_and_count, count_cached
from cipherpool.gateway.apidocs import ASSETS
from cipherpool.gateway.auth import Principal, bearer
from cipherpool.gateway.httpmetrics import route_path
from cipherpool.gateway.state import QUERIES, GatewayState
from cipherpool.outages import OUTAGE_TYPES, logged_outage
from cipherpool.services.queries import TokenGrant

log = logging.getLogger("cipherpool.gateway")
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIX = ASSETS + "/"  # the API pages' scripts and stylesheet (cipherpool.gateway.apidocs)
# Paths that check a credential of their own (not an account's or a token's): no principal,
# no per-account rate. /metrics: the operator's metrics token (cipherpool.gateway.metrics);
# /v1/platform/status: the same token (cipherpool.gateway.platform_status).
SELF_AUTHENTICATED_PATHS = frozenset({"/metrics", "/v1/platform/status"})
# And everything under this prefix: the operator's views (the metrics token), such as a node's
# lifetime figures (cipherpool.gateway.platform_status).
OPERATOR_PREFIX = "/v1/platform/"


def self_authenticated(path: str) -> bool:
    return path in SELF_AUTHENTICATED_PATHS or path.startswith(OPERATOR_PREFIX)


def error_body(exc: CipherpoolError) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json"}
    if exc.retry_after_s is not None:  # a rate limit, an outage: when to try again
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return exc.http_status, headers, json.dumps(exc.to_wire()).encode()


async def send_error(send: Send, exc: CipherpoolError) -> None:
    status, headers, body = error_body(exc)
    raw = [(k.encode(), v.encode()) for k, v in headers.items()] + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(name.lower() == b"authorization" for name, _ in scope["headers"]) > 1:
            refused = BadRequest("Send one Authorization header, not several.")
            scope["app"].state.gw.refusals.add(refused, None)
            await send_error(send, refused)
            return
        path = route_path(scope)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            await self.app(scope, receive, send)
            return
        gw: GatewayState = scope["app"].state.gw
        state: dict[str, Any] = scope.setdefault("state", {})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        peer = scope.get("client")
        source = gw.throttle.source(peer[0] if peer else None, headers)
        if self_authenticated(path):
            await self._self_authenticated(gw, source, scope, receive, send)
            return
        cap = gw.body_cap(scope["method"], path)
        small = _at_most(headers.get("content-length"), min(LOOP_MAX_BYTES, cap))  # (over the cap: a 413, counted here)
        deferrable = scope["method"] == "POST" and path == QUERIES and small
        try:
            principal = await self._admit_cached(gw, headers.get("authorization"), source, state, deferrable)
            if principal is None:
                principal = await run_in_threadpool(self._admit, gw, headers.get("authorization"), source, state)
            declared = headers.get("content-length")
            if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > cap):
                raise PayloadTooLarge(f"The body is larger than this endpoint's limit of {cap} bytes.")
        except CipherpoolError as exc:
            gw.refusals.add(exc, state)
            await send_error(send, exc)
            return
        except OUTAGE_TYPES as exc:
            outage = logged_outage(exc, scope["method"], scope["path"], log)
            if outage is None:
                raise
            await send_error(send, outage)
            return
        state["principal"] = principal
        capped = _CappedBody(receive, send, cap, lambda exc: gw.refusals.add(exc, state))
        try:
            await self.app(scope, capped.receive, capped.send)
        finally:
            pending: PendingCount | None = state.get(PENDING)
            if pending is not None and not pending.done:  # the route never took it (its parameters refused, say)
                await pending.settle_quietly()

    async def _self_authenticated(self, gw: GatewayState, source: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A path that checks the metrics token itself: a throttled source is refused before
        it runs, and each 401 it answers counts as a failure of the source."""
        try:
            await run_in_threadpool(gw.throttle.check, source)
        except CipherpoolError as exc:
            gw.refusals.add(exc, None)
            await send_error(send, exc)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                await run_in_threadpool(gw.throttle.failed, source)
            await send(message)

        await self.app(scope, receive, counting)

    @staticmethod
    async def _admit_cached(
        gw: GatewayState, authorization: str | None, source: str, state: dict[str, Any], deferrable: bool = False
    ) -> Principal | None:
        """:meth:`_admit` on the event loop, for the usual request: its credential cached, and
        the platform's Redis the result waiter's, whose asyncio client makes the round trip
        (:meth:`~cipherpool.gateway.results.ResultWaiter.client_for`). A thread-pool hop costs
        more gateway CPU than that round trip. None, having done nothing, when either is not
        so: then :meth:`_admit` runs in the thread pool. What needs the database (a credential
        to authenticate again after a change, a serving state to load) still goes there, and
        every failure is counted against the source as in :meth:`_admit`.

        ``deferrable`` (a small query's submit): a token's request whose serving state is cached
        too leaves its count to the query's admission, one script for both
        (:mod:`cipherpool.gateway.admission`), as a :class:`PendingCount` in ``state``."""
        client = gw.waiter.client_for(gw.settings.effective_store_url())
        if client is None:
            return None
        try:
            credential = bearer(authorization)
        except AuthError:
            return None  # _admit refuses it, and counts the failure
        seen = gw.auth.generations()  # before the cache is read (cipherpool.gateway.admit)
        try:
            principal = gw.auth.cached_principal(credential)
        except AuthError:  # cached, and expired since
            await run_in_threadpool(gw.throttle.failed, source)
            raise
        if principal is None:
            return None
        state["principal"] = principal
        if (
            deferrable
            and isinstance(principal, TokenGrant)
            and not gw.limiter.refused_now(principal.account_id, principal.token_id)
        ):
            served = gw.auth.cached_serving(principal)
            if served is not None:
                state[PENDING] = PendingCount(gw, credential, source, principal, served, seen)
                return served
        return await count_cached(gw, client, credential, source, principal, seen)

    @staticmethod
    def _admit(gw: GatewayState, authorization: str | None, source: str, state: dict[str, Any] | None = None) -> Principal:
        """:func:`~cipherpool.gateway.admit.authenticate_and_count`, in the thread pool."""
        return authenticate_and_count(gw, authorization, source, state)


def _at_most(declared: str | None, limit: int) -> bool:
    """Whether a ``Content-Length`` is declared and at most ``limit``."""
    return declared is not None and declared.isascii() and declared.isdigit() and int(declared) <= limit


DRAIN_MAX_BYTES = 64 * 1024 * 1024


class _CappedBody:
    """Counts body bytes as the app reads them; past the cap it answers 413 itself, reads
    (and drops) the rest of the body up to DRAIN_MAX_BYTES so that closing the connection
    does not reset it before the client has read the 413, tells the app the client left, and
    drops whatever the app tries to send afterwards."""

    def __init__(self, receive: Receive, send: Send, cap: int, refused: Callable[[CipherpoolError], None] = lambda _: None):
        self._receive, self._send, self._cap, self._refused = receive, send, cap, refused
        self._seen = 0
        self._answered = False
        self._started = False

    async def receive(self) -> Message:
        if self._answered:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._cap:
                if not self._started:
                    self._answered = True
                    too_large = PayloadTooLarge(f"The body is larger than this endpoint's limit of {self._cap} bytes.")
                    self._refused(too_large)
                    await send_error(self._send, too_large)
                    await self._drain(message)
                return {"type": "http.disconnect"}
        return message

    async def _drain(self, message: Message) -> None:
        drained = 0
        while message.get("more_body") and drained < DRAIN_MAX_BYTES:
            message = await self._receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))

    async def send(self, message: Message) -> None:
        if self._answered:
            return
        if message["type"] == "http.response.start":
            self._started = True
        await self._send(message)
