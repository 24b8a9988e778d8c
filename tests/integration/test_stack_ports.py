"""The embedded stack picks free ports for Redis, Flower and the gateway, and lets each go
before the child binds it: another process may bind it in between (another stack starting, a
test's server). A child that dies at start for that reason is started again on another port;
the stack comes up and says so. Here each of the three is handed a port this test holds."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest

from cipherpool.config.settings import Settings
from cipherpool.stack import embedded, redis_server
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.stack.supervisor import free_port

pytestmark = pytest.mark.integration


def first_taken(held: int, times: int = 1):
    """free_port, except that its first ``times`` answers are a port another socket holds."""
    answers = iter([held] * times)
    return lambda: next(answers, None) or free_port()


def test_children_that_lose_their_port_at_start_move_to_another(tmp_path, monkeypatch, caplog):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        monkeypatch.setattr(redis_server, "free_port", first_taken(held))
        monkeypatch.setattr(embedded, "free_port", first_taken(held, times=2))  # flower's, then the gateway's
        caplog.set_level(logging.WARNING, logger="cipherpool.stack")
        settings = Settings(data_dir=tmp_path / "platform")
        with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=True)) as stack:
            assert f":{held}" not in stack.broker_url
            assert not stack.gateway_url.endswith(f":{held}") and not stack.flower_url.endswith(f":{held}")
            with urllib.request.urlopen(stack.gateway_url + "/v1/ready", timeout=10) as ready:
                assert ready.status == 200
            with urllib.request.urlopen(stack.flower_url + "/healthcheck", timeout=10) as flower:
                assert flower.status == 200
            restarts = {c.name: c.pid for c in stack.supervisor.children}
            assert set(restarts) == {"redis", "control", "node1", "flower", "gateway"}  # moved in place, none added
    moved = [r.getMessage() for r in caplog.records if f"lost port {held} " in r.getMessage()]
    assert sorted(m.split()[0] for m in moved) == ["flower", "gateway", "redis-server"], moved


def test_a_child_that_dies_at_start_for_another_reason_is_reported_with_its_log(tmp_path, monkeypatch):
    """Not a taken port: no second try, and the error carries the end of the child's log."""
    monkeypatch.setattr(embedded, "GATEWAY", embedded.GATEWAY[:-1] + ["cipherpool.gateway.app:no_such_factory"])
    settings = Settings(data_dir=tmp_path / "platform")
    with pytest.raises(embedded.PlatformError) as refused:
        EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)).start()
    message = refused.value.message
    assert message.startswith("gateway exited during start (code 3); the end of its log (")
    assert "no_such_factory" in message, message
