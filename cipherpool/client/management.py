"""ManagementClient: what a provider scripts against (deploy, workers, tokens), over HTTP."""

from __future__ import annotations

from urllib.parse import quote
from pathlib import Path
from typing import Any

from cipherpool.api.schemas import (
    DeployIn, ModelOut, TokenCreated, TokenIn, TokenOut, UploadOut, WorkerIn, WorkerOut, WorkerStats,
)
from cipherpool.client.transport import Transport, client_settings
from cipherpool.config.settings import Settings
from cipherpool.errors import WorkerStartFailed
from cipherpool.fhe.deployment import load_deployment
from cipherpool.statuses import WorkerStatus
from cipherpool.waiting import WaitTimeout, wait_until

POLL_S = 0.25
UPLOAD_TIMEOUT_S = 600.0


WorkerInfo = WorkerOut  # the name of 0.1, kept for scripts that import it


class ManagementClient:
    """A provider's handle on the platform: ``ManagementClient(api_key, url=...)``.

    The URL is ``url=``, else ``CIPHERPOOL_URL``, else the local stack's (what `cipherpool up`
    wrote in the data directory); the key is ``api_key=`` or ``CIPHERPOOL_API_KEY``."""

    def __init__(self, api_key: str | None = None, url: str | None = None, *, settings: Settings | None = None):
        settings = client_settings(url, settings)
        self._t = Transport(settings, api_key or settings.api_key, "No API key: pass api_key= or set CIPHERPOOL_API_KEY.")
        self.api_key = self._t.credential
        self.settings = settings

    # models
    def deploy_model(self, name: str, path: str | Path, hardware: str = "cpu") -> ModelOut:
        """Upload a ``FHEModelDev(...).save()`` directory and register it (not yet active)."""
        deployment = load_deployment(path)
        client, server = (
            self._t.call("PUT", "/v1/uploads", UploadOut, content=data, timeout=UPLOAD_TIMEOUT_S,
                         headers={"Content-Type": "application/octet-stream"})
            for data in (deployment.client_zip, deployment.server_zip)
        )
        body = DeployIn(name=name, client_upload=client.upload_id, server_upload=server.upload_id, hardware=hardware)
        return self._t.call("POST", "/v1/models", ModelOut, json=body.model_dump())

    def list_models(self) -> list[ModelOut]:
        return self._t.call("GET", "/v1/models", list[ModelOut])

    def activate_model(self, name: str) -> ModelOut:
        return self._t.call("POST", f"/v1/models/{quote(name, safe='')}/activate", ModelOut)

    def deactivate_model(self, name: str) -> ModelOut:
        return self._t.call("POST", f"/v1/models/{quote(name, safe='')}/deactivate", ModelOut)

    # workers
    def start_worker(self, model: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        """Bind a free pool node to the model; returns once it serves, or raises why not."""
        worker = self._worker("POST", "/v1/workers", json=WorkerIn(model=model).model_dump())
        if not wait:
            return worker
        worker = self._wait_while(worker, WorkerStatus.STARTING, timeout)
        if worker.status != WorkerStatus.RUNNING:
            still_loading = worker.status == WorkerStatus.STARTING
            reason = worker.error or ("still loading after the timeout" if still_loading else "no reason given")
            raise WorkerStartFailed(
                f"Worker {worker.id} for model {worker.model!r} on {worker.node} is {worker.status.value}: {reason}"
            )
        return worker

    def stop_worker(self, worker_id: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        worker = self._worker("POST", f"/v1/workers/{quote(worker_id, safe='')}/stop")
        return self._wait_while(worker, WorkerStatus.STOPPING, timeout) if wait else worker

    def get_worker(self, worker_id: str) -> WorkerInfo:
        return self._worker("GET", f"/v1/workers/{quote(worker_id, safe='')}")

    def list_workers(self, model: str | None = None) -> list[WorkerInfo]:
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/workers", list[WorkerOut], params=params)

    def worker_stats(self, model: str | None = None) -> list[WorkerStats]:
        """Live figures of each running worker: its own query counts and times (this binding
        only), its node's lifetime figures under ``node_lifetime``, the node's key cache."""
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/workers/stats", list[WorkerStats], params=params)

    # tokens
    def create_token(self, name: str, model: str, ttl_s: float | None = None) -> str:
        """A new access token for one model; the value is shown only now."""
        body = TokenIn(name=name, model=model, ttl_s=ttl_s)
        return self._t.call("POST", "/v1/tokens", TokenCreated, json=body.model_dump()).token

    def revoke_token(self, token_id: str) -> TokenOut:
        return self._t.call("POST", f"/v1/tokens/{quote(token_id, safe='')}/revoke", TokenOut)

    def list_tokens(self) -> list[TokenOut]:
        return self._t.call("GET", "/v1/tokens", list[TokenOut])

    def close(self) -> None:
        self._t.close()

    def _worker(self, method: str, path: str, **kwargs: Any) -> WorkerInfo:
        return self._t.call(method, path, WorkerOut, **kwargs)

    def _wait_while(self, worker: WorkerInfo, status: WorkerStatus, timeout: float | None) -> WorkerInfo:
        """The worker once its status is no longer ``status``, or as last seen at the timeout
        (the caller tells the user what a worker still in ``status`` means)."""
        latest = worker

        def moved_on() -> WorkerInfo | None:
            nonlocal latest
            if latest.status == status:
                latest = self.get_worker(worker.id)
            return latest if latest.status != status else None

        try:
            return wait_until(moved_on, timeout or self.settings.worker_start_timeout_s, interval_s=POLL_S)
        except WaitTimeout:
            return latest
