"""What every client of the gateway shares: its settings, one bearer credential on one HTTP
transport, traffic observation, and closing (also as a context manager)."""

from __future__ import annotations

from typing import Self

from cipherpool.client.traffic import TrafficLog
from cipherpool.client.transport import Transport, client_settings
from cipherpool.config.settings import Settings


class GatewayClient:
    """A client of the gateway: ``url=`` (else ``CIPHERPOOL_URL``, else the local stack's),
    ``settings=``, and a credential (``missing`` says how to give one when there is none)."""

    def __init__(self, credential: str | None, url: str | None, settings: Settings | None, missing: str):
        self.settings = client_settings(url, settings)
        self._t = Transport(self.settings, credential, missing)

    def observe(self, log: TrafficLog) -> None:
        """Record this client's requests in ``log`` from now on (sizes, and that no body held
        what the log guards)."""
        self._t.observe(log.hooks())

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
