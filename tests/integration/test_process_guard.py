"""Processes that ran FHE keep Python's SIGPIPE and the exit status they mean
(cipherpool/fhe/process.py): concrete's runtime, started at the first FHE run, installs a
SIGPIPE handler that kills the process and stops itself at exit with ``exit(0)``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cipherpool.config.settings import Settings
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from tests.integration.broken_pipe_hook import EVENTS_FILE
from tests.integration.helpers import serve

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BROKEN_PIPE_HOOK = "tests.integration.broken_pipe_hook:BrokenPipeWriter"
SIGPIPE_BIT = 1 << (signal.SIGPIPE - 1)

INNER_TEST = """
import numpy as np


def test_fhe_then_fail():
    from concrete.ml.sklearn import LogisticRegression

    x = np.random.RandomState(0).rand(40, 3)
    y = (x[:, 0] > 0.5).astype(int)
    model = LogisticRegression(n_bits=4).fit(x, y)
    model.compile(x)
    model.predict(x[:1], fhe="execute")
    assert False, "fails after an in-process FHE run"
"""


def _signals(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in lines if line.startswith(("SigIgn", "SigCgt")))}


def test_a_failing_test_after_an_in_process_fhe_run_fails_the_test_run(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # With the project's conftest (what scripts/test.sh runs), the failure is the exit status
    guarded = subprocess.run(
        [*pytest_cmd, "-p", "tests.conftest", str(tmp_path / "test_inner.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed" in guarded.stdout, guarded.stdout[-2000:]
    assert guarded.returncode == 1, guarded.stdout[-2000:]

    # Without it, the same failing run exits 0: the hazard the guard removes
    bare = subprocess.run(
        [*pytest_cmd, str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "1 failed" in bare.stdout, bare.stdout[-2000:]
    assert bare.returncode == 0, (
        "concrete no longer turns exit statuses into 0: cipherpool/fhe/process.py and this control can be simplified"
    )


def test_a_node_that_ran_fhe_survives_broken_pipes_and_exits_with_its_own_status(examples, tmp_path):
    example = examples["cancer"]
    settings = Settings(data_dir=tmp_path / "platform", query_timeout_s=120, node_hooks=[BROKEN_PIPE_HOOK])
    with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)) as stack:
        node = next(c for c in stack.supervisor.children if c.name.startswith("node"))
        pid = node.pid
        # Given a node that loaded a model and ran FHE (the key's warm-up, then queries)
        mc, qc, _ = serve(stack, example, "cancer", tmp_path / "keys")
        x = example.x_test[:3]
        # When it writes to a closed socket after each query, in its own process
        for row in x:
            np.testing.assert_allclose(qc.predict(row), example.clear(row[None]), atol=1e-3)
        # Then every write failed with EPIPE, the node lived through each and served the next
        tries = [json.loads(line) for line in (settings.data_dir / EVENTS_FILE).read_text().splitlines()]
        assert [t["outcome"] for t in tries] == ["BrokenPipeError"] * len(x)
        assert {t["pid"] for t in tries} == {pid}
        assert node.alive() and node.pid == pid
        assert _signals(pid)["SigIgn"] & SIGPIPE_BIT, "SIGPIPE is not ignored on a node that ran FHE"
        qc.close()
        mc.close()

        # And it leaves with the status Celery means: SIGINT is a warm shutdown with exit code 1
        os.kill(pid, signal.SIGINT)
        assert node.process.wait(timeout=60) == 1
