"""Helpers for integration tests (fixtures stay in conftest.py; helpers are imported from here)."""

from __future__ import annotations

from pathlib import Path

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.client.query import QueryHandle
from cipherpool.examples import Example
from cipherpool.stack.embedded import EmbeddedStack


def serve(
    stack: EmbeddedStack, example: Example, name: str, key_dir: Path, **overrides: object
) -> tuple[ManagementClient, QueryClient, str]:
    """On a stack of its own: an account, the model deployed, activated and served by one
    worker, and a client whose keys are uploaded. Returns (management, query, worker id)."""
    settings = stack.client_settings.model_copy(update=overrides)
    mc = ManagementClient(stack.create_account("p"), settings=settings)
    mc.deploy_model(name, example.path)
    mc.activate_model(name)
    worker = mc.start_worker(name)
    qc = QueryClient(mc.create_token("u", model=name), settings=settings, key_dir=key_dir)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    return mc, qc, worker.id


def node_of(stack: EmbeddedStack, handle: QueryHandle) -> str | None:
    """Which pool node computed a finished query: the operator's view, read from the result in
    the platform's Redis (end users are not told: no node name reaches them)."""
    from redis import Redis

    from cipherpool.gateway.results import computed_by

    client = Redis.from_url(stack.platform_settings.effective_result_backend())
    try:
        return computed_by(client, handle.id)
    finally:
        client.close()
