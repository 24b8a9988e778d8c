"""How a client talks to the platform: HTTP to the gateway, nothing else.

A client holds a gateway URL and one bearer credential (an API key or an access token). It
imports none of the platform's code: no Celery, no Redis, no database. Errors come back as
``{"code", "message"}`` and are raised here as the same typed exceptions the platform raised.
A 429 is retried after its ``Retry-After`` (the request was not processed), a few times.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

from cipherpool.config.settings import Settings, get_settings
from cipherpool.errors import ConfigurationError, GatewayUnavailable, RateLimited, RemoteError, from_wire

T = TypeVar("T")
RATE_LIMIT_RETRIES = 3
MAX_RETRY_AFTER_S = 5.0
CONNECT_TIMEOUT_S = 5.0


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
        from cipherpool import __version__

        self.credential = credential
        self.settings = settings
        self.url = settings.effective_url()
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {credential}", "User-Agent": f"cipherpool/{__version__}"},
            timeout=httpx.Timeout(settings.management_timeout_s, connect=CONNECT_TIMEOUT_S),
        )

    def set_credential(self, credential: str) -> None:
        """Use another bearer credential from now on (a rotated key, a new token)."""
        self.credential = credential
        self._http.headers["Authorization"] = f"Bearer {credential}"

    def observe(self, hooks: dict[str, list[Any]]) -> None:
        """Add httpx event hooks (``{"request": [...], "response": [...]}``) to every later
        request, e.g. a :class:`cipherpool.client.traffic.TrafficLog`'s."""
        current = self._http.event_hooks
        self._http.event_hooks = {kind: [*current.get(kind, []), *hooks.get(kind, [])] for kind in ("request", "response")}

    def request(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request; the response if it succeeded, else its typed error raised here."""
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise GatewayUnavailable(f"Cannot reach the gateway at {self.url}: {exc}") from None
            if response.status_code < 400:
                return response
            error = _error_of(response)
            if not isinstance(error, RateLimited) or attempt == RATE_LIMIT_RETRIES:
                raise error
            time.sleep(min(MAX_RETRY_AFTER_S, float(response.headers.get("retry-after", "1"))))
        raise AssertionError("unreachable")

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


def _error_of(response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        error = from_wire(body)
        if isinstance(error, RateLimited):
            error.retry_after_s = float(response.headers.get("retry-after", "1"))
        return error
    return RemoteError(f"The gateway answered HTTP {response.status_code}: {response.text[:200]}")
