"""The whole platform on PostgreSQL, by URL: control worker, pool node and queries."""

import numpy as np
import pytest

from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from tests.integration.helpers import serve

pytestmark = pytest.mark.integration


def test_the_platform_runs_on_postgresql(examples, tmp_path, fresh_postgres_url):
    example = examples["cancer"]
    settings = Settings(data_dir=tmp_path / "platform", database_url=fresh_postgres_url)
    with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)) as stack:
        mc, qc, worker_id = serve(stack, example, "cancer", tmp_path / "keys")
        x = example.x_test[:3]
        np.testing.assert_allclose(qc.predict(x), example.clear(x), atol=1e-3)
        assert mc.stop_worker(worker_id).status.value == "stopped"
        qc.close()
        mc.close()
