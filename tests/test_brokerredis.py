"""kombu's Redis transport with one client object per channel (cipherpool/brokerredis.py):
named for plain redis:// brokers in every platform process, the same commands on the same
connections, a new client once the channel's pool is replaced."""

from __future__ import annotations

import contextlib
import time

import pytest
from kombu import Connection
from redis import exceptions as redis_errors

from cipherpool import brokerredis
from cipherpool.config.celery import ONE_CLIENT_REDIS_TRANSPORT, broker_transport, celery_config
from cipherpool.config.settings import Settings
from cipherpool.waiting import wait_until
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


@contextlib.contextmanager
def delivered_on(url, **options):
    """A channel on the transport, a message taken from its queue without kombu's copy (the test
    makes the copy), and a plain client on the same Redis."""
    import redis

    with Connection(url, transport=ONE_CLIENT_REDIS_TRANSPORT, transport_options=options) as connection:
        channel = connection.default_channel
        channel.basic_publish(channel.prepare_message("a query"), exchange="", routing_key="copies-q")
        message = channel.basic_get("copies-q", no_ack=True)
        assert message is not None
        plain = redis.Redis.from_url(url)
        try:
            yield channel, message, plain
        finally:
            plain.client_unpause()
            channel._purge("copies-q")
            plain.delete(channel.unacked_key, channel.unacked_index_key, "pfx:unacked", "pfx:unacked_index", "pfx:copies-q")
            plain.close()


@pytest.fixture
def delivered(url):
    with delivered_on(url) as found:
        yield found


def copied(plain, channel, tag, prefix="") -> bool:
    return (
        bool(plain.hexists(prefix + channel.unacked_key, tag))
        and plain.zscore(prefix + channel.unacked_index_key, tag) is not None
    )


class LateNetwork:
    """The copy's connection with its sends held back until a reply is read: the network
    delivering the copy after what goes on other connections (Redis orders nothing between two
    connections)."""

    _sock = None  # (nothing to read before a send: the real one's sends are held here)

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


def held_back(qos, monkeypatch) -> LateNetwork:
    late = LateNetwork(qos._connection())

    def connection():
        qos._own = late
        return late

    monkeypatch.setattr(qos, "_connection", connection)
    return late


def test_the_copy_is_sent_without_waiting_for_redis(delivered):
    """The consumer's thread does not wait for Redis (here paused: every write held)."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    assert isinstance(qos, brokerredis.QoS)
    plain.client_pause(HELD_MS, all=False)
    started = time.monotonic()
    qos.append(message, tag)
    assert time.monotonic() - started < HELD_MS / 2000, "sent, not waited for"
    assert not copied(plain, channel, tag)  # held by the pause
    qos.settle()
    assert time.monotonic() - started >= HELD_MS / 1000 * 0.9 and copied(plain, channel, tag)
    qos.ack(tag)
    assert not copied(plain, channel, tag)


@pytest.mark.parametrize("remove", ["ack", "reject"])
def test_a_late_copy_never_outlives_its_acknowledgement(delivered, monkeypatch, remove):
    """A copy left behind after its ack would be restored once the visibility timeout passes:
    the query run twice. The ack (or a rejection without requeue) reads the copy's reply first."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    late = held_back(qos, monkeypatch)
    qos.append(message, tag)
    assert late.held and not copied(plain, channel, tag)
    if remove == "ack":
        qos.ack(tag)
    else:
        qos.reject(tag, requeue=False)
    qos.settle()  # whatever is still held goes out now
    assert not copied(plain, channel, tag) and channel._size("copies-q") == 0


@pytest.mark.parametrize("restore", ["requeue", "close"])
def test_a_restore_finds_the_copy_it_restores(delivered, monkeypatch, restore):
    """A requeue, or the channel's close with the message unacknowledged, restores it from its
    copy: the copy's reply first, or the restore would read nothing and the query be lost."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    held_back(qos, monkeypatch)
    qos.append(message, tag)
    if restore == "requeue":
        qos.reject(tag, requeue=True)
    else:
        qos.restore_unacked_once()
    assert channel._size("copies-q") == 1 and not copied(plain, channel, tag)


def test_a_copy_whose_connection_died_unanswered_is_written_again(delivered):
    """The copy's commands held by the pause die with their connection (killed by Redis): no
    reply, so it is written again the ordinary way, and the next goes out on a new connection."""
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
    qos.append(message, tag)
    assert qos._own._sock.getsockname()[1] != port
    qos.ack(tag)
    assert not copied(plain, channel, tag)


def test_a_connection_redis_dropped_while_idle_is_found_before_the_send(delivered):
    """Redis restarted, or dropped the idle connection: found before the next copy goes out
    (its close is there to read), so that copy is in Redis at once, not at the ack."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    qos.append(message, tag)
    qos.settle()
    host, port = qos._own._sock.getsockname()[:2]
    plain.client_kill(f"{host}:{port}")
    time.sleep(0.1)
    qos.append(message, "second")
    assert wait_until(lambda: copied(plain, channel, "second"), 1.0, interval_s=0.01)
    assert qos._own._sock.getsockname()[1] != port
    qos.ack(tag)
    qos.ack("second")


def test_a_transaction_answered_with_an_error_is_no_confirmation(delivered):
    """A command failed inside EXEC (here a WRONGTYPE) left the copy unwritten: it is written
    again (and refused again: raised, as kombu's own write raises), and kept for later."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    plain.set(channel.unacked_key, "not a hash")
    qos.append(message, tag)
    with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
        qos.settle()
    assert [copy.tag for copy in qos._unwritten] == [tag]
    plain.delete(channel.unacked_key)
    qos.settle()
    assert copied(plain, channel, tag) and not qos._unwritten
    qos.ack(tag)


def test_another_querys_unwritten_copy_does_not_hold_an_acknowledgement(delivered, monkeypatch):
    """A copy that cannot be written (Redis refusing it) is kept for the next settle; an ack of
    another query meanwhile still removes that query's copy and frees its slot: a node's slots
    are not held by a copy that is not theirs."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    qos.append(message, tag)
    qos.settle()  # the first query's copy is in
    late = held_back(qos, monkeypatch)
    qos.append(message, "second")
    late.held.clear()  # the second's commands never reach Redis ...
    late.real.disconnect()  # ... and its connection breaks: no reply
    write = qos._write

    def refused(copies):
        raise redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(qos, "_write", refused)  # ... and writing it again is refused
    qos.ack(tag)  # logs the other's refusal; removes this one's copy
    assert not copied(plain, channel, tag) and tag in qos._dirty
    assert [copy.tag for copy in qos._unwritten] == ["second"] and not copied(plain, channel, "second")
    monkeypatch.setattr(qos, "_write", write)
    qos.settle()  # Redis takes it now
    assert copied(plain, channel, "second") and not qos._unwritten
    qos.ack("second")


def refuse_writes(qos, monkeypatch) -> None:
    def refused(copies):
        raise redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(qos, "_write", refused)


def lose_the_copy(qos, monkeypatch, message, tag) -> None:
    """The copy's commands never reach Redis and its connection breaks: no reply."""
    late = held_back(qos, monkeypatch)
    qos.append(message, tag)
    late.held.clear()
    late.real.disconnect()


def test_an_acknowledged_querys_lost_copy_is_not_written_after_its_removal(delivered, monkeypatch):
    """Its own copy unconfirmed and not writable now: the ack removes it and forgets it, or a
    later settle would write it after the removal, and the query run again after the
    visibility timeout."""
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    write = qos._write
    lose_the_copy(qos, monkeypatch, message, tag)
    refuse_writes(qos, monkeypatch)
    qos.ack(tag)
    monkeypatch.setattr(qos, "_write", write)
    qos.settle()
    assert not copied(plain, channel, tag) and not qos._unwritten


def test_a_requeue_is_not_failed_by_another_querys_unwritten_copy(delivered, monkeypatch):
    channel, message, plain = delivered
    qos, tag = channel.qos, message.delivery_tag
    qos.append(message, tag)
    qos.settle()
    write = qos._write
    lose_the_copy(qos, monkeypatch, message, "second")
    refuse_writes(qos, monkeypatch)
    qos.reject(tag, requeue=True)  # the other's refusal is logged; this one's copy is restored
    assert channel._size("copies-q") == 1 and [copy.tag for copy in qos._unwritten] == ["second"]
    monkeypatch.setattr(qos, "_write", write)
    qos.settle()
    qos.ack("second")


def test_a_key_prefix_keeps_kombus_own_write(url):
    with delivered_on(url, global_keyprefix="pfx:") as (channel, message, plain):
        qos, tag = channel.qos, message.delivery_tag
        qos.append(message, tag)
        assert copied(plain, channel, tag, prefix="pfx:") and not plain.exists(channel.unacked_key)
        assert qos._own is None
        qos.ack(tag)
        assert not copied(plain, channel, tag, prefix="pfx:")


def test_a_channel_closed_with_a_copy_in_flight_restores_the_message(url, monkeypatch):
    import redis

    plain = redis.Redis.from_url(url)
    with Connection(url, transport=ONE_CLIENT_REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        channel.basic_publish(channel.prepare_message("a query"), exchange="", routing_key="closing-q")
        message = channel.basic_get("closing-q", no_ack=True)
        qos = channel.qos
        late = held_back(qos, monkeypatch)
        qos.append(message, message.delivery_tag)
        assert late.held
        channel.close()  # the unacknowledged message goes back to its queue, from its copy
        assert qos._own is None and late.real._sock is None
    assert plain.llen("closing-q") == 1 and not plain.hexists("unacked", message.delivery_tag)
    plain.delete("closing-q")
    plain.close()


def test_the_channels_close_closes_the_copies_connection(url):
    with Connection(url, transport=ONE_CLIENT_REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        channel.basic_publish(channel.prepare_message("a query"), exchange="", routing_key="copies-q")
        message = channel.basic_get("copies-q", no_ack=False)  # kombu's way: append, here ours
        own = channel.qos._own
        assert own is not None and own._sock is not None
        message.ack()
    assert own._sock is None and channel.qos._own is None
