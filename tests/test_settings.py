import pytest

from cipherpool.config.celery import celery_config
from cipherpool.config.settings import Settings, mask_url
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


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql+psycopg://app:s3cret@db:5432/cp", "postgresql+psycopg://app:***@db:5432/cp"),
        ("redis://u:s3cret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://127.0.0.1:6379/0?password=s3cret", "redis://127.0.0.1:6379/0?password=***"),
        (
            "redis://h/0?db=1&Password=s3cret&pass=s3cret&socket_timeout=5",
            "redis://h/0?db=1&Password=***&pass=***&socket_timeout=5",
        ),
        ("postgresql://u@db/cp?sslmode=require&sslpassword=s3cret", "postgresql://u@db/cp?sslmode=require&sslpassword=***"),
        (
            "amqp://h//?secret=s3cret&token=s3cret&api_key=s3cret&access-token=s3cret",
            "amqp://h//?secret=***&token=***&api_key=***&access-token=***",
        ),
        (
            "redis://:s3cret@h1:6379/0;redis://:s3cret@h2:6379/0?password=s3cret",
            "redis://:***@h1:6379/0;redis://:***@h2:6379/0?password=***",
        ),
        ("redis://:s3cret@h:port/0", "redis://:***@h:port/0"),
        ("sqlite:////var/lib/cipherpool/cipherpool.db", "sqlite:////var/lib/cipherpool/cipherpool.db"),
        ("redis://h:6379/0?ssl_cert_reqs=none", "redis://h:6379/0?ssl_cert_reqs=none"),
    ],
    ids=[
        "userinfo",
        "postgres",
        "ipv6",
        "query",
        "query-mixed",
        "sslpassword",
        "tokens",
        "failover",
        "bad-port",
        "sqlite",
        "nothing-secret",
    ],
)
def test_mask_url_hides_every_secret_and_keeps_the_rest(url, masked):
    assert mask_url(url) == masked
    assert "s3cret" not in mask_url(url)
