"""ManagementClient: what a provider scripts against (deploy, workers, tokens)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherpool.config.settings import Settings
from cipherpool.client.transport import Transport, client_settings
from cipherpool.statuses import WorkerStatus
from cipherpool.errors import ConfigurationError, WorkerStartFailed
from cipherpool.fhe.deployment import load_deployment
from cipherpool.names import TASK_PREFIX, node_queue
from cipherpool.store import BlobKind

C = TASK_PREFIX + "control."
POLL_S = 0.25


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    model: str
    node: str
    status: WorkerStatus
    error: str | None
    node_status: str | None = None
    started_at: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerInfo:
        return cls(
            id=d["id"], model=d["model"], node=d["node"], status=WorkerStatus(d["status"]),
            error=d.get("error"), node_status=d.get("node_status"), started_at=d.get("started_at"),
        )


class ManagementClient:
    def __init__(self, api_key: str | None = None, broker_url: str | None = None, *, settings: Settings | None = None):
        settings = client_settings(broker_url, settings)
        self.api_key = api_key or settings.api_key
        if not self.api_key:
            raise ConfigurationError("No API key: pass api_key= or set CIPHERPOOL_API_KEY.")
        self._t = Transport(settings)

    def _call(self, op: str, **kwargs: Any) -> Any:
        return self._t.call(C + op, api_key=self.api_key, **kwargs)

    # models
    def deploy_model(self, name: str, path: str | Path, hardware: str = "cpu") -> dict:
        """Upload a ``FHEModelDev(...).save()`` directory and register it (not yet active)."""
        deployment = load_deployment(path)
        client_blob = self._t.store.put(BlobKind.CLIENT_ZIP, deployment.client_zip)
        server_blob = self._t.store.put(BlobKind.SERVER_ZIP, deployment.server_zip)
        return self._call("deploy_model", name=name, client_blob=client_blob, server_blob=server_blob, hardware=hardware)

    def list_models(self) -> list[dict]:
        return self._call("list_models")

    def activate_model(self, name: str) -> dict:
        return self._call("set_model_status", name=name, status="active")

    def deactivate_model(self, name: str) -> dict:
        return self._call("set_model_status", name=name, status="inactive")

    # workers
    def start_worker(self, model: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        """Bind a free pool node to the model; returns once it serves, or raises why not."""
        worker = WorkerInfo.from_dict(self._call("start_worker", model=model))
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
        worker = WorkerInfo.from_dict(self._call("stop_worker", worker_id=worker_id))
        return self._wait_while(worker, WorkerStatus.STOPPING, timeout) if wait else worker

    def get_worker(self, worker_id: str) -> WorkerInfo:
        return WorkerInfo.from_dict(self._call("get_worker", worker_id=worker_id))

    def list_workers(self, model: str | None = None) -> list[WorkerInfo]:
        return [WorkerInfo.from_dict(d) for d in self._call("list_workers", model=model)]

    def worker_stats(self, model: str | None = None) -> list[dict]:
        """Live figures of each running worker's node: query counts, compute times, key cache."""
        stats = []
        for worker in self.list_workers(model):
            if worker.status == WorkerStatus.RUNNING and worker.node_status == "online":
                result = self._t.send(TASK_PREFIX + "node.stats", {}, queue=node_queue(worker.node))
                figures = self._t.wait(result, self._t.settings.management_timeout_s, "node stats")
                stats.append({"worker_id": worker.id, **figures})
        return stats

    # tokens
    def create_token(self, name: str, model: str, ttl_s: float | None = None) -> str:
        """A new access token for one model; the value is shown only now."""
        return self._call("create_token", name=name, model=model, ttl_s=ttl_s)["token"]

    def revoke_token(self, token_id: str) -> dict:
        return self._call("revoke_token", token_id=token_id)

    def list_tokens(self) -> list[dict]:
        return self._call("list_tokens")

    def close(self) -> None:
        self._t.close()

    def _wait_while(self, worker: WorkerInfo, status: WorkerStatus, timeout: float | None) -> WorkerInfo:
        deadline = time.monotonic() + (timeout or self._t.settings.worker_start_timeout_s)
        while worker.status == status and time.monotonic() < deadline:
            time.sleep(POLL_S)
            worker = self.get_worker(worker.id)
        return worker
