import pytest

from cipherpool.config.celery import celery_config
from cipherpool.config.settings import Settings
from cipherpool.errors import ConfigurationError


def test_settings_read_the_cipherpool_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("CIPHERPOOL_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CIPHERPOOL_KEY_CACHE_BYTES", "1234")
    monkeypatch.setenv("CIPHERPOOL_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.broker_url == "redis://127.0.0.1:1/0"
    assert s.key_cache_bytes == 1234
    assert s.effective_database_url() == f"sqlite:///{tmp_path / 'cipherpool.db'}"
    assert s.effective_store_url() == s.effective_result_backend() == s.broker_url


def test_missing_broker_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="CIPHERPOOL_BROKER_URL"):
        Settings(broker_url=None).effective_broker_url()


def test_celery_config_never_accepts_pickle_and_is_safe_for_long_queries():
    conf = celery_config(Settings(broker_url="redis://127.0.0.1:1/0", visibility_timeout_s=7200))
    for key in ("task_serializer", "result_serializer"):
        assert conf[key] == "msgpack"
    assert "pickle" not in conf["accept_content"] and "pickle" not in conf["result_accept_content"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 7200
    assert conf["broker_transport_options"]["unacked_restore_throttle"] == 1
