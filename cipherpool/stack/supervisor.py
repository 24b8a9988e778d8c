"""Child processes started and stopped by their own process ids, leaving no orphans.

Each child leads its own process group (so a stop reaches whatever it forked) and is asked
by the kernel to die with its parent (PR_SET_PDEATHSIG), so even a SIGKILLed `cipherpool up`
leaves nothing behind. That signal is SIGTERM, a graceful stop that may wait without end, so
a Python child (``python -m MODULE``) runs under :mod:`cipherpool.stack.child`, which SIGKILLs
it once the grace period of :meth:`Supervisor.stop_all` has passed with its parent gone.

A child that exits is started again, unless it keeps dying right after its start: then it is
given up for good, so a broken configuration neither spins forever nor comes back later. The
clock is injected, so tests drive time instead of waiting for it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cipherpool.config.settings import mask_url
from cipherpool.files import private_dir

log = logging.getLogger("cipherpool.stack")
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 20.0
QUICK_DEATH_S = 10.0  # a child that dies sooner than this after its start is crash-looping
MAX_QUICK_DEATHS = 3
WATCH_INTERVAL_S = 1.0
TAIL_LINES = 12  # of a dead child's log, in the error that reports it
PORT_MOVES = 3  # a child that lost the port chosen for it at start is moved at most this often
TAIL_BYTES = 16 * 1024
Clock = Callable[[], float]  # seconds, monotonic


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another socket holds ``port`` now, as a server binding it would find (with
    SO_REUSEADDR, so a connection in TIME_WAIT does not count). A child that died at start on
    a port :func:`free_port` chose may have lost it to whoever bound it in between."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:  # taken; or not bindable at all here (no IPv6), which a new port will not mend
        return exc.errno == errno.EADDRINUSE
    return False


def _child_setup() -> None:
    """In the child before exec: die with the parent, and create only private files."""
    os.umask(0o077)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def guarded(argv: list[str], parent: int, grace_s: float) -> list[str]:
    """``argv`` run under :mod:`cipherpool.stack.child` if it runs a Python module (``python
    -m MODULE ...``): killed ``grace_s`` after ``parent`` dies. Anything else (Redis) as is:
    it stops at the kernel's SIGTERM."""
    if len(argv) < 3 or argv[1] != "-m":
        return argv
    return [argv[0], "-m", "cipherpool.stack.child", "--parent", str(parent), "--grace", f"{grace_s:g}", *argv[2:]]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    env: dict[str, str]
    started_at: float  # on the supervisor's clock
    quick_deaths: int = 0  # consecutive exits within QUICK_DEATH_S of a start
    given_up: bool = False  # crash-looping: stays dead, never started again
    log_offset: int = 0  # where this run's lines start in its log

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The end of what this run of it logged (the log is appended to across runs): why a
        child that exited did, for an error that says it at once."""
        try:
            with self.log_path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(self.log_offset, end - TAIL_BYTES))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _ignore(child: Child) -> None:
    pass


class Supervisor:
    def __init__(self, log_dir: Path, clock: Clock = time.monotonic, orphan_grace_s: float = STOP_GRACE_S) -> None:
        self.log_dir = log_dir
        self.clock = clock
        self.orphan_grace_s = orphan_grace_s  # a Python child's grace after this process dies
        self.children: list[Child] = []
        self._hidden: set[str] = set()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        private_dir(self.log_dir)
        log_path = self.log_dir / f"{name}.log"
        offset = _size(log_path)
        child = Child(name, self._spawn(name, argv, env), log_path, argv, env, self.clock(), log_offset=offset)
        self.children.append(child)
        return child

    def hide(self, *secrets: str | None) -> None:
        """Secrets (a password, a login) that :meth:`exited` never shows, should a child log one."""
        self._hidden.update(s for s in secrets if s)

    def exited(self, child: Child, during: str) -> str:
        """'NAME exited DURING (code N); the end of its log (PATH): ...', for an error: with
        the secrets given to :meth:`hide` and the passwords of URLs masked (Redis prints a
        config line it refuses, password and all)."""
        tail = _masked(child.tail(), self._hidden)
        lines = "".join(f"\n  {line}" for line in tail.splitlines())
        ending = f"; the end of its log ({child.log_path}):{lines}" if lines else f" and logged nothing; see {child.log_path}"
        return f"{child.name} exited {during} (code {child.process.returncode}){ending}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        fd = os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            return subprocess.Popen(
                guarded(argv, os.getpid(), self.orphan_grace_s),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_child_setup,
            )

    def restart(self, child: Child, argv: list[str] | None = None) -> Child:
        """Start ``child`` again in its place (with ``argv`` if given), after killing whatever
        its last run left in its group."""
        _signal_group(child, signal.SIGKILL)
        if child.alive():
            child.process.wait(timeout=5)  # reaped: no zombie, and its port let go
        if argv is not None:
            child.argv = argv
        child.log_offset = _size(child.log_path)
        child.process = self._spawn(child.name, child.argv, child.env)
        child.started_at = self.clock()
        return child

    def dead(self) -> list[Child]:
        """Every child that is not running, the given-up ones included."""
        return [c for c in self.children if not c.alive()]

    def restart_dead(self) -> tuple[list[Child], list[Child]]:
        """Start again, with the same command, every child that exited; (restarted, given up).

        A child that keeps dying within QUICK_DEATH_S of its start is given up after
        MAX_QUICK_DEATHS tries, so a broken configuration does not spin forever. It is in
        ``given up`` once, at the call that gives it up; afterwards it is left alone for good
        (however long ago its last start was) and only ``dead()`` still lists it."""
        restarted: list[Child] = []
        given_up: list[Child] = []
        for child in self.dead():
            if child.given_up:
                continue
            quick = self.clock() - child.started_at < QUICK_DEATH_S
            child.quick_deaths = child.quick_deaths + 1 if quick else 0
            if child.quick_deaths >= MAX_QUICK_DEATHS:
                log.error(
                    "%s keeps exiting at start (last code %s); not restarting it. See %s",
                    child.name,
                    child.process.returncode,
                    child.log_path,
                )
                _signal_group(child, signal.SIGKILL)  # anything it left in its group
                child.given_up = True
                given_up.append(child)
                continue
            log.warning("%s (pid %s) exited with %s; restarting it", child.name, child.pid, child.process.returncode)
            restarted.append(self.restart(child))
        return restarted, given_up

    def watch(
        self,
        stop: threading.Event,
        on_restart: Callable[[Child], None] = _ignore,
        on_give_up: Callable[[Child], None] = _ignore,
        interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        """Restart dead children every ``interval_s`` until ``stop`` is set (what `cipherpool up`
        does while it runs). The callbacks only report: each restart, and each child given up,
        once. Waiting is ``stop.wait``, so a stop is seen at once, not at the next round."""
        while not stop.wait(interval_s):
            restarted, given_up = self.restart_dead()
            for child in restarted:
                on_restart(child)
            for child in given_up:
                on_give_up(child)

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM each group (newest first), then SIGKILL what outlives the grace period."""
        for child in reversed(self.children):
            _signal_group(child, signal.SIGTERM)
        deadline = self.clock() + grace_s
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) ignored SIGTERM; killing it", child.name, child.pid)
            _signal_group(child, signal.SIGKILL)  # stragglers in its group, if any
            if child.alive():
                child.process.wait(timeout=5)
        self.children.clear()


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
SHORTEST_SECRET = 4  # shorter "secrets" would mask half the log


def _masked(text: str, secrets: set[str]) -> str:
    """``text`` with each secret, and each URL's password and secret parameters, as ***."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= SHORTEST_SECRET:
            text = text.replace(secret, "***")
    return URL.sub(lambda url: mask_url(url.group()), text)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)  # the child leads its own group: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
