"""`cipherpool up` starts every part, serves Flower, and stops with no process left behind."""

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from cipherpool.waiting import WaitTimeout, wait_until

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 180


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class Up:
    """A running `cipherpool up`: its process, what it printed until ready, and the rest as it comes."""

    proc: subprocess.Popen
    output: str
    lines: queue.Queue
    reader: threading.Thread

    def rest(self) -> str:
        """Everything printed after ready, once the process has exited and all of it is read."""
        wait_until(lambda: not self.reader.is_alive(), 10, interval_s=0.05)
        return drain(self.lines)


def start_up(tmp_path) -> Up:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cipherpool", "--data-dir", str(tmp_path), "up", "--nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen, deadline = [], time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith("ready."):
            return Up(proc, "".join(seen), lines, reader)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("cipherpool up did not become ready:\n" + "".join(seen))


def drain(lines) -> str:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def children(output):
    return {name: int(pid) for name, pid in re.findall(r"^\s+(\w+)\s+pid (\d+)$", output, re.M)}


def test_up_starts_everything_and_stops_cleanly_on_sigterm(tmp_path):
    up = start_up(tmp_path)
    proc, output = up.proc, up.output
    pids = children(output)
    try:
        assert set(pids) == {"redis", "control", "node1", "beat", "flower", "gateway"}
        assert all(alive(p) for p in pids.values())
        # The gateway's URL is printed and written where local clients find it, with no exports
        gateway = re.search(r"^ready\. Gateway (http://127\.0\.0\.1:\d+) ", output, re.M).group(1)
        stack_file = tmp_path / "stack.json"
        assert json.loads(stack_file.read_text())["url"] == gateway
        assert stack_file.stat().st_mode & 0o777 == 0o600
        assert urllib.request.urlopen(gateway + "/v1/health", timeout=5).status == 200
        assert urllib.request.urlopen(gateway + "/docs", timeout=5).status == 200
        # The broker's password is masked in the output
        password = (tmp_path / "redis" / "password").read_text().strip()
        assert password not in output and "redis://:***@127.0.0.1:" in output
        # Flower answers its health check, but its pages need the login printed (kept in a 0600 file)
        flower = re.search(r"flower\s+(http://127\.0\.0\.1:\d+)", output).group(1)
        login = re.search(r"flower login: (\S+) \(kept in ", output).group(1)
        assert (tmp_path / "flower-login").read_text().strip() == login
        assert (tmp_path / "flower-login").stat().st_mode & 0o777 == 0o600
        wait_until(
            lambda: answers(flower + "/healthcheck"),
            30,
            interval_s=0.5,
            error=AssertionError("Flower's healthcheck did not answer within 30s"),
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(flower + "/api/workers", timeout=5)
        assert refused.value.code == 401
        authorised = urllib.request.Request(
            flower + "/api/workers", headers={"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
        )
        assert urllib.request.urlopen(authorised, timeout=10).status == 200
        # A second `up` on the same data dir is refused, naming this one, and takes nothing over
        second = subprocess.run(
            [sys.executable, "-m", "cipherpool", "--data-dir", str(tmp_path), "up", "--nodes", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 5, second.stdout + second.stderr
        assert f"pid {proc.pid}, gateway {gateway}, started at " in second.stderr
        assert json.loads(stack_file.read_text())["url"] == gateway
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        rest = up.rest()
    assert proc.returncode == 0, rest
    assert "stopped." in rest
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert not (tmp_path / "stack.json").exists()  # a stopped stack is not advertised


def test_children_die_with_a_killed_up(tmp_path):
    up = start_up(tmp_path)
    pids = children(up.output)
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(timeout=10)
    try:
        wait_until(lambda: not any(alive(p) for p in pids.values()), 30)
    except WaitTimeout:
        pass  # named below
    survivors = [name for name, pid in pids.items() if alive(pid)]
    for name in survivors:  # clean up what we started, by pid, before failing
        os.killpg(pids[name], signal.SIGKILL)
    assert survivors == []
