"""What crossed the network: a client's HTTP exchanges, counted per step, and a check that no
request body carried bytes that must stay on the client (its secret key, its clear input).

The demo's ``--explain`` reads it. It watches the same httpx client that sends the requests,
so what it reports is what was sent, not what the code meant to send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

SECRET_WINDOW = 512  # bytes: 64 key coefficients, far too long to turn up by chance
SECRET_SAMPLES = 16
UNCHECKED = "a streamed request body that could not be checked"


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    sent: int
    received: int


@dataclass
class Totals:
    requests: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class TrafficLog:
    exchanges: list[Exchange] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # what a request body held that it must not
    checked_bodies: int = 0
    unchecked_bodies: int = 0  # streamed bodies the check could not read (each one a finding)
    _guards: list[tuple[str, bytes]] = field(default_factory=list)

    def guard(self, what: str, data: bytes, *, whole: bool = False) -> int:
        """Watch for ``data`` in every later request body: the whole of it (``whole``), or
        windows sampled across it; returns how many patterns are watched."""
        if whole:
            patterns = [data] if data else []
        elif len(data) <= SECRET_WINDOW:
            patterns = [data]
        else:
            step = max(1, (len(data) - SECRET_WINDOW) // SECRET_SAMPLES)
            patterns = [data[i : i + SECRET_WINDOW] for i in range(0, len(data) - SECRET_WINDOW + 1, step)][:SECRET_SAMPLES]
        self._guards.extend((what, p) for p in patterns)
        return len(patterns)

    def hooks(self) -> dict[str, list[Callable[[Any], None]]]:
        return {"request": [self._on_request], "response": [self._on_response]}

    def mark(self) -> int:
        return len(self.exchanges)

    def since(self, mark: int) -> Totals:
        totals = Totals()
        for exchange in self.exchanges[mark:]:
            totals.requests += 1
            totals.sent += exchange.sent
            totals.received += exchange.received
        return totals

    def _on_request(self, request: httpx.Request) -> None:
        try:
            body = request.content
        except httpx.RequestNotRead:
            # A streamed body cannot be read here without consuming it: the check cannot vouch
            # for it, so it counts against the verdict rather than passing unseen.
            self.unchecked_bodies += 1
            if UNCHECKED not in self.found:
                self.found.append(UNCHECKED)
            return
        self.checked_bodies += 1
        for what, pattern in self._guards:
            if pattern in body and what not in self.found:
                self.found.append(what)

    def _on_response(self, response: httpx.Response) -> None:
        request = response.request
        response.read()
        try:
            sent = len(request.content)
        except httpx.RequestNotRead:  # streamed: what its header announced
            sent = int(request.headers.get("content-length") or 0)
        self.exchanges.append(Exchange(request.method, request.url.path, sent, len(response.content)))
