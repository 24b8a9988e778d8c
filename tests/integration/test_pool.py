"""A pool of two nodes: one model served by both, a model that cannot load, a full pool."""

import numpy as np
import pytest
from sqlmodel import select

from cipherpool import errors
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.db.tables import PoolNode
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from tests.helpers import make_deployment
from tests.integration.helpers import node_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pool(tmp_path_factory, examples):
    settings = Settings(data_dir=tmp_path_factory.mktemp("pool"), query_timeout_s=120)
    with EmbeddedStack(settings, StackOptions(nodes=2, beat=False, flower=False)) as stack:
        settings = stack.client_settings
        mc = ManagementClient(stack.create_account("p"), settings=settings)
        mc.deploy_model("digits", examples["digits"].path, max_workers=3)
        mc.activate_model("digits")
        yield stack, settings, mc
        mc.close()


def test_a_model_that_cannot_load_fails_with_the_reason_and_frees_the_node(pool, tmp_path):
    stack, settings, mc = pool
    mc.deploy_model("hollow", make_deployment(tmp_path / "hollow"))
    mc.activate_model("hollow")
    with pytest.raises(errors.WorkerStartFailed, match="hollow"):
        mc.start_worker("hollow")
    [failed] = mc.list_workers("hollow")
    assert failed.status.value == "failed" and failed.error
    # and the node it was given is free again (the test looks behind the gateway, at the claims)
    with session_scope(stack.settings.effective_database_url()) as session:
        claims = {node.name: node.worker_id for node in session.exec(select(PoolNode))}
    assert failed.node in claims and set(claims.values()) == {None}


def test_two_nodes_serve_one_model_and_a_full_pool_says_so(pool, examples, tmp_path):
    stack, settings, mc = pool
    first, second = mc.start_worker("digits"), mc.start_worker("digits")
    assert first.node != second.node
    with pytest.raises(errors.NoFreeNode):
        mc.start_worker("digits")
    qc = QueryClient(mc.create_token("u", model="digits"), settings=settings, key_dir=tmp_path)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    x = examples["digits"].x_test[:4]
    handles = [qc.submit(qc.encrypt(row)) for row in x]
    decrypted = np.concatenate([qc.decrypt(h.result()) for h in handles])
    np.testing.assert_allclose(decrypted, examples["digits"].clear(x), atol=1e-3)
    assert {node_of(stack, h) for h in handles} == {first.node, second.node}
    qc.close()
