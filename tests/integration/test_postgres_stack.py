"""The whole platform on PostgreSQL, by URL: control worker, pool node and queries."""

import numpy as np
import pytest

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.services.accounts import create_account
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration


def test_the_platform_runs_on_postgresql(examples, tmp_path, fresh_postgres_url):
    example = examples["cancer"]
    settings = Settings(data_dir=tmp_path / "platform", database_url=fresh_postgres_url)
    with EmbeddedStack(settings, StackOptions(workers=1, beat=False, flower=False)) as stack:
        with session_scope(fresh_postgres_url) as session:
            _, api_key = create_account(session, "pg")
        mc = ManagementClient(api_key, broker_url=stack.broker_url, settings=settings)
        mc.deploy_model("cancer", example.path)
        mc.activate_model("cancer")
        worker = mc.start_worker("cancer")
        qc = QueryClient(mc.create_token("u", model="cancer"), broker_url=stack.broker_url,
                         settings=settings, key_dir=tmp_path / "keys")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        x = example.x_test[:3]
        np.testing.assert_allclose(qc.predict(x), example.clear(x), atol=1e-3)
        assert mc.stop_worker(worker.id).status.value == "stopped"
        qc.close()
        mc.close()
