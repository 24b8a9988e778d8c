"""How a client talks to the platform: tasks over the broker, blobs through the store.

A client holds only a broker URL (the store defaults to the same Redis) and its credential.
It imports none of the worker-side code and never touches the database.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from cipherpool.config.celery import create_app
from cipherpool.config.settings import Settings, get_settings
from cipherpool.errors import BrokerUnavailable, CipherpoolError, QueryTimeout, RemoteError
from cipherpool.messages import redacted_kwargs, unwrap
from cipherpool.names import CONTROL_QUEUE
from cipherpool.store import BlobStore


def client_settings(broker_url: str | None, settings: Settings | None) -> Settings:
    settings = settings or get_settings()
    if broker_url:
        settings = settings.model_copy(update={"broker_url": broker_url})
    settings.effective_broker_url()  # a clear ConfigurationError now rather than later
    return settings


class Transport:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings, name="cipherpool-client")
        self.store = BlobStore.from_url(settings.effective_store_url())
        self._reachable = False

    def send(self, task: str, kwargs: dict[str, Any], queue: str = CONTROL_QUEUE,
             expires_s: float | None = None) -> AsyncResult:
        """Publish a task; with ``expires_s`` a node discards it once nobody waits any more."""
        if not self._reachable:
            # One ping up front: Celery's own reconnect loop would take ~20 s to give up.
            self.store.ping()
            self._reachable = True
        try:
            return self.app.send_task(task, kwargs=kwargs, queue=queue, kwargsrepr=redacted_kwargs(kwargs),
                                      expires=expires_s)
        except OperationalError as exc:
            raise BrokerUnavailable(f"Cannot reach the broker at {self._where()}: {exc}") from None

    def wait(self, result: AsyncResult, timeout: float, what: str) -> Any:
        """The task's value, or its typed error raised here."""
        try:
            envelope = result.get(timeout=timeout, propagate=True)
        except CeleryTimeout:
            raise QueryTimeout(
                f"No answer to {what} within {timeout:g}s: is a worker serving it "
                "(`cipherpool worker list`), and is the broker reachable?"
            ) from None
        except (OperationalError, redis.ConnectionError) as exc:
            raise BrokerUnavailable(f"Lost the broker at {self._where()}: {exc}") from None
        except RuntimeError as exc:
            if "result store" not in str(exc):
                raise RemoteError(f"{what} failed on the platform: {exc}") from None
            raise BrokerUnavailable(f"Cannot reach the result backend at {self._where()}.") from None
        except CipherpoolError:
            raise
        except Exception as exc:  # a bug on the platform side, reported as a FAILURE
            raise RemoteError(f"{what} failed on the platform: {type(exc).__name__}: {exc}") from None
        finally:
            result.forget()
        return unwrap(envelope)

    def call(self, task: str, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.wait(self.send(task, kwargs), timeout or self.settings.management_timeout_s, task)

    def close(self) -> None:
        self.app.close()

    def _where(self) -> str:
        url = self.settings.effective_broker_url()
        return url.split("@")[-1]  # never print a password
