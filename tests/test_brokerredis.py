"""kombu's Redis transport with one client object per channel (cipherpool/brokerredis.py):
named for plain redis:// brokers in every platform process, the same commands on the same
connections, a new client once the channel's pool is replaced."""

from __future__ import annotations

import time

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


# --- the unacknowledged copy, sent without waiting for its reply -----------------------------------

HELD_MS = 400


@pytest.fixture
def delivered(url):
    """A channel on the transport, a message taken from its queue without kombu's copy (the test
    makes the copy), and a plain client on the same Redis."""
    import redis

    with Connection(url, transport=ONE_CLIENT_REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        channel.basic_publish(channel.prepare_message("a query"), exchange="", routing_key="copies-q")
        message = channel.basic_get("copies-q", no_ack=True)
        assert message is not None
        plain = redis.Redis.from_url(url)
        yield channel, message, plain
        plain.client_unpause()
        channel._purge("copies-q")
        plain.delete(channel.unacked_key, channel.unacked_index_key)
        plain.close()


def copied(plain, channel, tag) -> bool:
    return plain.hexists(channel.unacked_key, tag) and plain.zscore(channel.unacked_index_key, tag) is not None


def test_the_copy_is_sent_without_waiting_and_in_before_the_ack(delivered):
    """The consumer's thread does not wait for Redis (here: paused, every write held); the ack
    waits for the copy's reply, so it cannot remove the copy before it is written."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    assert isinstance(qos, brokerredis.QoS)
    plain.client_pause(HELD_MS, all=False)  # writes held until then
    started = time.monotonic()
    qos.append(message, tag)
    assert time.monotonic() - started < HELD_MS / 4000, "sent, not waited for"
    assert not copied(plain, channel, tag)  # held by the pause
    qos.settle()
    assert time.monotonic() - started >= HELD_MS / 1000 * 0.9 and copied(plain, channel, tag)
    plain.client_pause(HELD_MS, all=False)
    qos.append(message, tag)
    qos.ack(tag)  # reads the reply first: the copy is in, then removed
    assert not copied(plain, channel, tag)


def test_a_requeue_finds_the_copy_it_restores(delivered):
    """A rejection with requeue restores the message from its copy: the copy's reply first, or
    the restore would read nothing (reads are not held by the pause) and the message be lost."""
    channel, message, plain = delivered
    plain.client_pause(HELD_MS, all=False)
    channel.qos.append(message, message.delivery_tag)
    channel.qos.reject(message.delivery_tag, requeue=True)
    assert channel._size("copies-q") == 1 and not copied(plain, channel, message.delivery_tag)


def test_a_copy_whose_connection_died_unanswered_is_written_again(delivered):
    """The copy's commands held by the pause die with their connection (killed by Redis): no
    reply, so it is written again the ordinary way."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    plain.client_pause(HELD_MS, all=False)
    qos.append(message, tag)
    host, port = qos._own._sock.getsockname()[:2]
    plain.client_kill(f"{host}:{port}")
    plain.client_unpause()
    time.sleep(0.05)
    assert not copied(plain, channel, tag)  # the held commands went with the connection
    qos.settle()
    assert copied(plain, channel, tag)
    qos.append(message, tag)  # and the next copy goes out on a new connection of its own
    assert qos._own._sock.getsockname()[1] != port
    qos.ack(tag)
    assert not copied(plain, channel, tag)


class LateNetwork:
    """The copy's connection with its sends held back until a reply is read: the network
    delivering the copy after the acknowledgement, which goes on another connection (Redis
    orders nothing between two connections)."""

    def __init__(self, real):
        self.real, self.held = real, []

    def pack_commands(self, commands):
        return self.real.pack_commands(commands)

    def send_packed_command(self, data, check_health=True):
        self.held.append(data)

    def read_response(self, **kwargs):
        for data in self.held:
            self.real.send_packed_command(data, check_health=False)
        self.held.clear()
        return self.real.read_response(**kwargs)

    def disconnect(self):
        self.real.disconnect()


@pytest.mark.parametrize("remove", ["ack", "reject"])
def test_a_late_copy_never_outlives_its_acknowledgement(delivered, monkeypatch, remove):
    """A copy left behind after its ack would be restored once the visibility timeout passes:
    the query run twice. The ack (or a rejection without requeue) reads the copy's reply first."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    late = LateNetwork(qos._connection())

    def connection():
        qos._own = late
        return late

    monkeypatch.setattr(qos, "_connection", connection)
    qos.append(message, tag)
    assert late.held and not copied(plain, channel, tag)
    if remove == "ack":
        qos.ack(tag)
    else:
        qos.reject(tag, requeue=False)
    qos.settle()  # whatever is still held goes out now
    assert not copied(plain, channel, tag) and channel._size("copies-q") == 0
