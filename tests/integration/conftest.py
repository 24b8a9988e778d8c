"""Integration fixtures: one embedded stack per session (own Redis on a free loopback port,
one control worker, two pool nodes, each a real `celery worker` process, and the gateway
under uvicorn), real concrete-ml models, all stopped by their own pids at the end. Clients
talk to the gateway only."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration
RECORDING_HOOK = "tests.integration.recording_hook:FileRecorder"


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer, train_digits

    root = tmp_path_factory.mktemp("models")
    return {"digits": train_digits(root / "digits"), "cancer": train_breast_cancer(root / "cancer")}


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    # Every node also runs a hook named in the settings, as an operator would plug one in.
    settings = Settings(data_dir=tmp_path_factory.mktemp("platform"), node_hooks=[RECORDING_HOOK])
    s = EmbeddedStack(settings, StackOptions(nodes=2, node_concurrency=2, beat=False, flower=False))
    with s:
        yield s


@dataclass
class Platform:
    stack: EmbeddedStack
    settings: Settings
    api_key: str
    mc: ManagementClient
    tokens: dict[str, str]
    workers: dict[str, str]

    def query_client(self, model: str, key_dir, token: str | None = None, **overrides) -> QueryClient:
        settings = self.settings.model_copy(update=overrides)
        return QueryClient(token or self.tokens[model], settings=settings, key_dir=key_dir)

    def account(self, name: str) -> ManagementClient:
        return ManagementClient(self.stack.create_account(name), settings=self.settings)


@pytest.fixture(scope="session")
def platform(stack, examples):
    settings = stack.client_settings.model_copy(update={"query_timeout_s": 120.0})
    api_key = stack.create_account("provider")
    mc = ManagementClient(api_key, settings=settings)
    tokens, workers = {}, {}
    for name, example in examples.items():
        mc.deploy_model(name, example.path)
        mc.activate_model(name)
        workers[name] = mc.start_worker(name).id
        tokens[name] = mc.create_token(f"{name}-user", model=name)
    yield Platform(stack, settings, api_key, mc, tokens, workers)
    mc.close()


@pytest.fixture(scope="session")
def clients(platform, tmp_path_factory):
    """One ready client per model: keys generated and uploaded."""
    made = {}
    for name in ("digits", "cancer"):
        qc = platform.query_client(name, tmp_path_factory.mktemp(f"keys-{name}"))
        qc.generate_keys()
        qc.upload_evaluation_keys()
        made[name] = qc
    yield made
    for qc in made.values():
        qc.close()
