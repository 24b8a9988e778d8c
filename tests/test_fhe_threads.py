"""What a node sets for OpenMP before concrete first runs (cipherpool/fhe/threads.py)."""

from __future__ import annotations

from cipherpool.config.settings import Settings
from cipherpool.fhe.threads import openmp_env


def test_a_node_sleeps_its_idle_openmp_threads_at_once_by_default(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.node_spin_ms == 0
    assert openmp_env(2, settings.node_spin_ms) == {"KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}


def test_the_team_size_is_left_to_openmp_without_a_profile_and_the_spin_is_settable(tmp_path, monkeypatch):
    monkeypatch.setenv("CIPHERPOOL_NODE_SPIN_MS", "200")
    assert openmp_env(None, Settings(data_dir=tmp_path).node_spin_ms) == {"KMP_BLOCKTIME": "200"}
