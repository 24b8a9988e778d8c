"""How a client talks to the platform: HTTP to the gateway, nothing else.

A client holds a gateway URL and one bearer credential (an API key or an access token). It
imports none of the platform's code: no Celery, no Redis, no database. Errors come back as
``{"code", "message"}`` and are raised here as the same typed exceptions the platform raised.
A 429 is retried after its ``Retry-After`` (the request was not processed), a few times.

A gateway restart (a deploy, a crash) must not fail a client whose query is safe in the
platform (broker and result backend keep it; a restarted gateway answers for it). So a call
that the gateway went away from is retried, with exponential backoff and jitter, until the
call's own deadline (a long poll's timeout) or ``gateway_retry_s``, and only when sending it
again cannot do anything twice:

* any request whose connection was never made (refused, timed out): nothing was sent;
* an idempotent one (GET, HEAD, OPTIONS, and this API's PUTs and DELETEs: each sets or removes
  a named thing, content-addressed uploads and keys included) also when the connection broke
  before an answer, and on 502/503/504 from a proxy (no typed body: the gateway behind it is
  away) or a typed ``broker_unavailable`` / ``database_unavailable`` (the gateway is up,
  Redis or the database is restarting). A typed 503 that describes the platform's state
  (``no_worker_up``, ``model_unavailable``) is an answer, not an outage, and is raised at
  once; so is ``remote_error`` (a fault, which a retry would only repeat).

A POST (a query's submit above all: it has no idempotency key, and two submits are two
queries, charged twice) is never sent again once it may have reached the gateway.

Retries start once this client has heard from the gateway: a gateway that never answered is
more likely a wrong URL or a stack not up than a restart, and that error should come at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

from cipherpool.client.lean import LeanLane, fits
from cipherpool.config.settings import Settings, get_settings
from cipherpool.errors import (
    ConfigurationError,
    GatewayUnavailable,
    NotFound,
    RateLimited,
    RemoteError,
    from_wire,
)
from cipherpool.waiting import Backoff, StateLog

T = TypeVar("T")
RATE_LIMIT_RETRIES = 3
MAX_RETRY_AFTER_S = 5.0
CONNECT_TIMEOUT_S = 5.0
MIN_CONNECT_TIMEOUT_S = 0.1  # the last try before a deadline still gets to connect
RETRY_FIRST_S = 0.1  # backoff: the first pause, doubled per try up to RETRY_MAX_S, times a jitter
RETRY_MAX_S = 2.0  # of 0.5-1 (clients that lost the same gateway do not all come back at once)
RETRY_JITTER = 0.5  # each pause times 0.5-1 (cipherpool.waiting.Backoff)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Failures before any byte of the request left: safe to retry whatever the method.
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The connection broke after the request (or part of it) left and before an answer: the
# gateway may have acted on it. Read and write timeouts are not here: a hung gateway is no
# restart, and a retry would only multiply the wait.
BROKEN = (httpx.ReadError, httpx.WriteError, httpx.CloseError, httpx.RemoteProtocolError)
PROXY_STATUSES = frozenset({502, 503, 504})
_LANE_KWARGS = frozenset({"content", "headers", "params", "timeout"})  # what a call on the lean lane may carry
# The gateway's own word that a part it needs is briefly away (wire codes: the stable contract).
TRANSIENT_CODES = frozenset({"broker_unavailable", "database_unavailable", "gateway_unavailable"})
log = logging.getLogger("cipherpool.client")


def client_settings(url: str | None, settings: Settings | None) -> Settings:
    settings = settings or get_settings()
    if url:
        settings = settings.model_copy(update={"url": url})
    settings.effective_url()  # a clear ConfigurationError now rather than later
    return settings


class Transport:
    def __init__(self, settings: Settings, credential: str | None, what: str):
        if not credential:
            raise ConfigurationError(what)
        from cipherpool.version import __version__

        self.credential = credential
        self.settings = settings
        self.url = settings.effective_url()
        self._user_agent = f"cipherpool/{__version__}"
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {credential}", "User-Agent": self._user_agent},
            timeout=httpx.Timeout(settings.management_timeout_s, connect=CONNECT_TIMEOUT_S),
        )
        # A query's own calls (its submit, its polls), the standard library's HTTP: see lean.py.
        self._lane = LeanLane(self.url) if settings.client_lean_http and fits(self.url) else None
        # An outage is logged once, when the first try of any call fails, and its end once.
        self._outage = StateLog(log, recovered_level=logging.INFO)
        self._heard = False  # the gateway has answered this client once: a failure now is an outage

    def set_credential(self, credential: str) -> None:
        """Use another bearer credential from now on (a rotated key, a new token)."""
        self.credential = credential
        self._http.headers["Authorization"] = f"Bearer {credential}"

    def observe(self, hooks: dict[str, list[Any]]) -> None:
        """Add httpx event hooks (``{"request": [...], "response": [...]}``) to every later
        request, e.g. a :class:`cipherpool.client.traffic.TrafficLog`'s."""
        current = self._http.event_hooks
        self._http.event_hooks = {kind: [*current.get(kind, []), *hooks.get(kind, [])] for kind in ("request", "response")}

    def request(
        self,
        method: str,
        path: str,
        *,
        retry_until: float | None = None,
        idempotent: bool | None = None,
        refresh: Callable[[float], dict[str, Any]] | None = None,
        query_path: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request; the response if it succeeded, else its typed error raised here.

        While the gateway is away it is retried (see the module's doc) until ``retry_until``
        (a ``time.monotonic()`` deadline; default ``gateway_retry_s`` from now), then
        GatewayUnavailable. ``idempotent`` overrides what the method says (a POST that the API
        makes safe to repeat). ``refresh(seconds_left)`` gives kwargs for each try, so that a
        long poll retried late asks the gateway to wait no longer than its call has left.
        ``timeout`` (a kwarg) is the read timeout of each try. ``query_path``: one of a query's
        own calls, sent on the lean lane where it can be (:mod:`cipherpool.client.lean`)."""
        method = method.upper()
        repeatable = (method in IDEMPOTENT_METHODS if idempotent is None else idempotent) and _replayable(kwargs)
        start = time.monotonic()
        deadline = start + self.settings.gateway_retry_s if retry_until is None else retry_until
        if not self._heard:
            deadline = start  # see the module's doc: no retry before the first answer
        tries = rate_limited = 0
        pauses = Backoff(RETRY_FIRST_S, RETRY_MAX_S, jitter=RETRY_JITTER)
        reached = False  # an earlier try may have reached the gateway (and done what was asked)
        while True:
            tries += 1
            left = deadline - time.monotonic()
            call = {**kwargs, **(refresh(left) if refresh else {})}
            read_s = call.pop("timeout", None)
            call["timeout"] = httpx.Timeout(
                self.settings.management_timeout_s if read_s is None else read_s,
                connect=min(CONNECT_TIMEOUT_S, max(left, MIN_CONNECT_TIMEOUT_S)),
            )
            pause = 0.0
            try:
                response = self._send(method, path, call, query_path)
            except httpx.TransportError as exc:
                unsent = isinstance(exc, UNSENT)
                if not unsent and not (repeatable and isinstance(exc, BROKEN)):
                    raise GatewayUnavailable(
                        f"The connection to the gateway at {self.url} broke during {method} {path} ({_say(exc)}). "
                        "It may have reached the gateway, so it was not sent again: that could do it twice."
                    ) from None
                reached = reached or not unsent
                failure = _say(exc)
            else:
                if response.status_code < 400:
                    self._back()
                    return response
                error = _error_of(response)
                if isinstance(error, RateLimited) and rate_limited < RATE_LIMIT_RETRIES:
                    rate_limited += 1
                    time.sleep(min(MAX_RETRY_AFTER_S, error.retry_after_s or 1.0))
                    continue
                if not (repeatable and _transient(response)):
                    self._back()
                    if reached and method == "DELETE" and isinstance(error, NotFound):
                        error.add_note(
                            "An earlier try of this DELETE reached the gateway before the connection "
                            "broke: that try may have deleted it."
                        )
                    raise error
                reached = True
                failure = f"HTTP {response.status_code}"
                pause = min(MAX_RETRY_AFTER_S, _seconds(response.headers.get("retry-after")))
            left = deadline - time.monotonic()
            if left <= 0 and tries == 1:
                raise GatewayUnavailable(f"Cannot reach the gateway at {self.url} ({failure}).")
            if left <= 0:
                raise GatewayUnavailable(
                    f"Cannot reach the gateway at {self.url} ({failure}): gave up on {method} {path} after "
                    f"{tries} tries in {time.monotonic() - start:.1f}s."
                )
            self._away(failure, method, path, left)
            time.sleep(min(left, max(pause, pauses.next())))

    def _send(self, method: str, path: str, call: dict[str, Any], query_path: bool) -> httpx.Response:
        """One try: on the lean lane for a query's call that it can send as httpx would (a body
        of bytes or none, nothing but parameters and headers besides, no event hooks, which
        observe httpx's own requests, and no cookies to send), else through httpx."""
        lane = self._lane
        if (
            query_path
            and lane is not None
            and call.keys() <= _LANE_KWARGS
            and isinstance(call.get("content"), bytes | None)
            and not any(self._http.event_hooks.values())
            and not self._http.cookies  # (a sticky load balancer's, set on an earlier call: httpx sends them)
        ):
            timeout: httpx.Timeout = call["timeout"]
            headers = {"authorization": f"Bearer {self.credential}", "user-agent": self._user_agent}
            headers.update((name.lower(), value) for name, value in call.get("headers", {}).items())
            return lane.request(
                method,
                path,
                headers=headers,
                params=call.get("params"),
                content=call.get("content"),
                connect_s=timeout.connect,
                read_s=timeout.read,
            )
        return self._http.request(method, path, **call)

    def _away(self, failure: str, method: str, path: str, left: float) -> None:
        """Log the start of an outage, once: every try of every call until the gateway answers is
        part of it."""
        self._outage.down(
            "The gateway at %s is unreachable (%s); retrying %s %s for up to %.0fs.", self.url, failure, method, path, left
        )

    def _back(self) -> None:
        """Log the end of an outage (any answer of the gateway's ends it), once."""
        self._heard = True
        self._outage.up("The gateway at %s answers again, after %.1fs.", self.url, lasted=True)

    def call(self, method: str, path: str, shape: type[T], **kwargs: Any) -> T:
        """A JSON request whose answer is validated against ``shape`` (a model of
        :mod:`cipherpool.api.schemas`, or a list of one) and returned as such."""
        response = self.request(method, path, **kwargs)
        try:
            return TypeAdapter(shape).validate_json(response.content)
        except ValidationError as exc:
            raise RemoteError(f"The gateway's answer to {method} {path} does not fit the API: {exc}") from None

    def close(self) -> None:
        self._http.close()
        if self._lane is not None:
            self._lane.close()


def _replayable(kwargs: dict[str, Any]) -> bool:
    """Whether the body can be sent again whole: a stream (an iterator) is spent by the first try."""
    content = kwargs.get("content")
    return content is None or isinstance(content, bytes | bytearray | str)


def _say(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: the backoff decides
        return 0.0


def _wire_body(response: httpx.Response) -> dict[str, Any] | None:
    """The gateway's typed error body, or None (a proxy's page, or garbage)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) and "code" in body else None


def _transient(response: httpx.Response) -> bool:
    """An answer that says the gateway is away, not what it thinks of the request: a proxy's
    502/503/504 (no typed body), or the gateway's own word that Redis is unreachable."""
    body = _wire_body(response)
    if body is None:
        return response.status_code in PROXY_STATUSES
    return str(body["code"]) in TRANSIENT_CODES


def _error_of(response: httpx.Response) -> Exception:
    body = _wire_body(response)
    if body is not None:
        error = from_wire(body)
        if isinstance(error, RateLimited):
            error.retry_after_s = _seconds(response.headers.get("retry-after", "1"))
        return error
    return RemoteError(f"The gateway answered HTTP {response.status_code}: {response.text[:200]}")
