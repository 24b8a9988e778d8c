"""The README's main job: `cipherpool demo` on the embedded stack, as a user runs it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_cleans_up(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cipherpool", "demo", "--data-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "FHE output equals clear output:        True" in out
    predicted = next(line for line in out.splitlines() if "predicted digit" in line).split()[-1]
    clear = next(line for line in out.splitlines() if "model's clear prediction" in line).split()[-1]
    assert predicted == clear
    assert "warmed on 1 of 1 node(s)" in out
    assert "key cache 4 hits / 0 miss" in out  # the warm-up loaded the key before the first query
