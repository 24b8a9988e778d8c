"""A pool of two nodes: one model served by both, a model that cannot load, a full pool."""

import io
import json
import zipfile

import numpy as np
import pytest

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.fhe.deployment import Versions
from cipherpool.services.accounts import create_account
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration


def fake_deployment(path):
    """Passes the provider-side checks but is no concrete circuit: fails on the node."""
    here = Versions.installed()
    versions = json.dumps({"concrete-ml": here.concrete_ml, "concrete-python": here.concrete_python, "python": here.python})

    def zipped(files):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return buf.getvalue()

    path.mkdir()
    client_files = {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions}
    (path / "client.zip").write_bytes(zipped(client_files))
    (path / "server.zip").write_bytes(zipped({"versions.json": versions}))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, examples):
    settings = Settings(data_dir=tmp_path_factory.mktemp("pool"), query_timeout_s=120)
    with EmbeddedStack(settings, StackOptions(workers=2, beat=False, flower=False)) as stack:
        with session_scope(settings.effective_database_url()) as session:
            _, api_key = create_account(session, "p")
        mc = ManagementClient(api_key, broker_url=stack.broker_url, settings=settings)
        mc.deploy_model("digits", examples["digits"].path)
        mc.activate_model("digits")
        yield stack, settings, mc
        mc.close()


def test_a_model_that_cannot_load_fails_with_the_reason_and_frees_the_node(pool, tmp_path):
    stack, settings, mc = pool
    mc.deploy_model("hollow", fake_deployment(tmp_path / "hollow"))
    with pytest.raises(errors.WorkerStartFailed, match="hollow"):
        mc.start_worker("hollow")
    [failed] = mc.list_workers("hollow")
    assert failed.status.value == "failed" and failed.error


def test_two_nodes_serve_one_model_and_a_full_pool_says_so(pool, examples, tmp_path):
    stack, settings, mc = pool
    first, second = mc.start_worker("digits"), mc.start_worker("digits")
    assert first.node != second.node
    with pytest.raises(errors.NoFreeNode):
        mc.start_worker("digits")
    qc = QueryClient(mc.create_token("u", model="digits"), broker_url=stack.broker_url, settings=settings, key_dir=tmp_path)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    x = examples["digits"].x_test[:4]
    handles = [qc.submit(qc.encrypt(row)) for row in x]
    decrypted = np.concatenate([qc.decrypt(h.result()) for h in handles])
    np.testing.assert_allclose(decrypted, examples["digits"].clear(x), atol=1e-3)
    assert {h.reply.node for h in handles} == {first.node, second.node}
    qc.close()
