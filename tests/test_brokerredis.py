"""kombu's Redis transport with one client object per channel (cipherpool/brokerredis.py):
named for plain redis:// brokers in every platform process, the same commands on the same
connections, a new client once the channel's pool is replaced."""

from __future__ import annotations

import pytest
from kombu import Connection

from cipherpool import brokerredis
from cipherpool.config.celery import ONE_CLIENT_REDIS_TRANSPORT, broker_transport, celery_config
from cipherpool.config.settings import Settings
from tests.helpers import own_redis


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with own_redis(tmp_path_factory, "brokerredis") as found:
        yield found


@pytest.mark.parametrize(
    ("broker", "named"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://a:6379/0;redis://b:6379/0", False),  # failover: kombu takes each alternate's from its scheme
        ("rediss://127.0.0.1:6380/0", False),  # kombu turns TLS on from the scheme's name
        ("redis://a:6379/0;rediss://b:6380/0", False),
        ("redis+socket:///run/redis.sock", False),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
    ],
)
def test_the_transport_is_named_for_plain_redis_brokers_only(broker, named, tmp_path):
    assert (broker_transport(broker) == ONE_CLIENT_REDIS_TRANSPORT) is named
    conf = celery_config(Settings(data_dir=tmp_path, broker_url=broker))
    assert conf.get("broker_transport") == (ONE_CLIENT_REDIS_TRANSPORT if named else None)


def test_a_channel_keeps_one_client_per_pool_and_its_commands_reach_redis(url):
    with Connection(url, transport=ONE_CLIENT_REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        assert isinstance(channel, brokerredis.Channel)
        built = []
        create = channel._create_client
        channel._create_client = lambda *a, **k: built.append(1) or create(*a, **k)
        for n in range(3):
            channel._put("brokerredis-q", {"body": n})
        assert channel._size("brokerredis-q") == 3 and len(built) == 1
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again and first.connection_pool is channel.pool
        channel._disconnect_pools()  # a disconnect, or a forked child: a new pool
        with channel.conn_or_acquire() as after:
            assert after is not first and after.connection_pool is channel.pool
        assert channel._get("brokerredis-q")["body"] == 0 and len(built) == 2
        channel._purge("brokerredis-q")
