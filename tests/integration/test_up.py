"""`cipherpool up` starts every part, serves Flower, and stops with no process left behind."""

import base64
import json
import os
import re
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

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


def start_up(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cipherpool", "--data-dir", str(tmp_path), "up", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
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
            return proc, "".join(seen), lines
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("cipherpool up did not become ready:\n" + "".join(seen))


def drain(lines) -> str:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


def children(output):
    return {name: int(pid) for name, pid in re.findall(r"^\s+(\w+)\s+pid (\d+)$", output, re.M)}


def test_up_starts_everything_and_stops_cleanly_on_sigterm(tmp_path):
    proc, output, lines = start_up(tmp_path)
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
        # Flower answers its health check, but its pages need the login printed once
        flower = re.search(r"flower\s+(http://127\.0\.0\.1:\d+)", output).group(1)
        login = re.search(r"flower login \(shown once\): (\S+)", output).group(1)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert urllib.request.urlopen(flower + "/healthcheck", timeout=2).status == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(flower + "/api/workers", timeout=5)
        assert refused.value.code == 401
        authorised = urllib.request.Request(flower + "/api/workers", headers={
            "Authorization": "Basic " + base64.b64encode(login.encode()).decode()})
        assert urllib.request.urlopen(authorised, timeout=10).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        time.sleep(0.2)
        rest = drain(lines)
    assert proc.returncode == 0, rest
    assert "stopped." in rest
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert not (tmp_path / "stack.json").exists()  # a stopped stack is not advertised


def test_children_die_with_a_killed_up(tmp_path):
    proc, output, _ = start_up(tmp_path)
    pids = children(output)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [name for name, pid in pids.items() if alive(pid)]
    for name in survivors:  # clean up what we started, by pid, before failing
        os.killpg(pids[name], signal.SIGKILL)
    assert survivors == []
