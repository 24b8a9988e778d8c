"""Routing by host class on RabbitMQ's exchanges (issue 8): the same direct exchange and
routing keys as on Redis. The broker is RabbitMQ on loopback (skipped, with the reason, where
none runs); results and blobs stay in Redis (the machine's, a database of its own)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from tests.integration.helpers import node_of

pytestmark = pytest.mark.integration
RABBITMQ = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
PROFILES = """
[profiles.cpu]
host_class = "cpu"
threads = 1

[profiles.gpu]
host_class = "gpu"
threads = 1
"""


def _listening(address: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(address) == 0


@pytest.mark.skipif(
    not (_listening(RABBITMQ) and _listening(REDIS)), reason="no RabbitMQ on 127.0.0.1:5672 or no Redis on 127.0.0.1:6379"
)
def test_routing_by_host_class_on_rabbitmq(examples, tmp_path):
    (tmp_path / "profiles.toml").write_text(PROFILES)
    redis = "redis://127.0.0.1:6379/14"  # model ids are random: queues and keys of other runs never collide
    settings = Settings(
        data_dir=tmp_path / "platform",
        profiles_file=tmp_path / "profiles.toml",
        broker_url="amqp://guest:guest@127.0.0.1:5672//",
        result_backend=redis,
        store_url=redis,
        query_timeout_s=120,
    )
    with EmbeddedStack(settings, StackOptions(profiles=["cpu", "gpu"], beat=False, flower=False)) as stack:
        mc = ManagementClient(stack.create_account("rabbit"), settings=stack.client_settings)
        served = {}
        for name, example, hardware in (("cancer-cpu", "cancer", "cpu"), ("digits-gpu", "digits", "gpu")):
            mc.deploy_model(name, examples[example].path, hardware=hardware)
            mc.activate_model(name)
            served[name] = mc.start_worker(name).node
            qc = QueryClient(mc.create_token(name, model=name), settings=stack.client_settings, key_dir=tmp_path / name)
            qc.generate_keys()
            qc.upload_evaluation_keys()
            x = examples[example].x_test[:2]
            handles = [qc.submit(qc.encrypt(row)) for row in x]
            outputs = np.concatenate([qc.decrypt(h.result(120)) for h in handles])
            np.testing.assert_allclose(outputs, examples[example].clear(x), atol=1e-3)
            assert {node_of(stack, h) for h in handles} == {served[name]}
            qc.close()
        assert "-cpu@" in served["cancer-cpu"] and "-gpu@" in served["digits-gpu"]
        mc.close()
