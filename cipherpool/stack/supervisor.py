"""Child processes started and stopped by their own process ids, leaving no orphans.

Each child leads its own process group (so a stop reaches whatever it forked) and is asked
by the kernel to die with its parent (PR_SET_PDEATHSIG), so even a SIGKILLed `cipherpool up`
leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cipherpool.files import private_dir

log = logging.getLogger("cipherpool.stack")
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 20.0
QUICK_DEATH_S = 10.0  # a child that dies sooner than this after its start is crash-looping
MAX_QUICK_DEATHS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    """In the child before exec: die with the parent, and create only private files."""
    os.umask(0o077)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    argv: list[str]
    env: dict[str, str]
    started_at: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0  # consecutive exits within QUICK_DEATH_S of a start

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        private_dir(self.log_dir)
        child = Child(name, self._spawn(name, argv, env), self.log_dir / f"{name}.log", argv, env)
        self.children.append(child)
        return child

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        fd = os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            return subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_child_setup,
            )

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def restart_dead(self) -> tuple[list[Child], list[Child]]:
        """Start again, with the same command, every child that exited; (restarted, given up).

        A child that keeps dying within QUICK_DEATH_S of its start is given up after
        MAX_QUICK_DEATHS tries, so a broken configuration does not spin forever."""
        restarted, given_up = [], []
        for child in self.dead():
            quick = time.monotonic() - child.started_at < QUICK_DEATH_S
            child.quick_deaths = child.quick_deaths + 1 if quick else 0
            if child.quick_deaths >= MAX_QUICK_DEATHS:
                given_up.append(child)
                continue
            log.warning("%s (pid %s) exited with %s; restarting it", child.name, child.pid, child.process.returncode)
            _signal_group(child, signal.SIGKILL)  # anything it left in its group
            child.process = self._spawn(child.name, child.argv, child.env)
            child.started_at = time.monotonic()
            restarted.append(child)
        return restarted, given_up

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM each group (newest first), then SIGKILL what outlives the grace period."""
        for child in reversed(self.children):
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) ignored SIGTERM; killing it", child.name, child.pid)
            _signal_group(child, signal.SIGKILL)  # stragglers in its group, if any
            if child.alive():
                child.process.wait(timeout=5)
        self.children.clear()


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)  # the child leads its own group: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
