"""Hosts apart on one machine: a network namespace joined to the host by a veth pair.

A process started in a :class:`Namespace` has its own network stack: it reaches the host only
at ``host_address`` (the host-side end of the veth pair), as a node on another host reaches
Redis over the network, not over loopback. That makes a network partition something a test
can do to one process while the rest of the platform runs on: :meth:`Namespace.partition`
sets the host-side end of the link down (packets in either direction are dropped, TCP
connections stall rather than break, as when a switch or a cable fails), and
:meth:`Namespace.heal` sets it up again. Nothing is signalled to the process: it finds out,
or not, the way it would on a real network.

A service that listens on loopback only (the machine's PostgreSQL or RabbitMQ) is reached from
a namespace through a :class:`TcpRelay` listening on the host-side address; the relay's far
side stays on loopback, so a partition cuts exactly the namespace's traffic.

Needs root (``ip netns``). Every name starts with a prefix of the caller's (``cleanup(prefix)``
removes what a killed earlier run left), addresses are in a private 10.x range the caller
picks, and :meth:`Namespace.teardown` removes the namespace and both veth ends. Only
``ip`` is run: no firewall rules, no routes beyond the /30 of each pair.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field

IP_TIMEOUT_S = 10.0
MAX_IFNAME = 15  # Linux interface names: IFNAMSIZ - 1


def ip_binary() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ip_binary(), *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can): a test skips with this reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no `ip` (iproute2) on PATH"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def cleanup(prefix: str) -> list[str]:
    """Remove the namespaces and veth links whose names start with ``prefix`` (left by a run
    that was killed before its teardown); returns what was removed. Only the caller's prefix:
    never anything else on the machine."""
    removed = []
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(prefix):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def cleanup_idle(prefix: str) -> list[str]:
    """Like :func:`cleanup`, for callers whose runs may overlap (two test sessions on one
    machine): only the namespaces of ``prefix`` in which no process runs (a live run has its
    processes in its own), with their veth pairs, and host-side links of ``prefix`` whose
    namespace is gone. Returns what was removed."""
    removed = []
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()]
    for name in names:
        if name.startswith(prefix) and not _ip("netns", "pids", name, check=False).stdout.split():
            _ip("link", "del", f"{name}-h", check=False)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":", 2)[1].strip().split("@")[0] if ":" in line else ""
        if link.startswith(prefix) and link.endswith("-h") and link.removesuffix("-h") not in names:
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def free_subnets(count: int, within: str = "10.200.0.0/13") -> list[str]:
    """``count`` /30 subnets of one /24 of ``within`` (private) that no address of this
    machine falls in, picked at random among the free ones, so that runs side by side do not
    collide. ValueError where none is free."""
    import random

    block = ipaddress.ip_network(within)
    if not block.subnet_of(ipaddress.ip_network("10.0.0.0/8")) or count > 64:
        raise ValueError(f"{within}: inside 10.0.0.0/8, and at most 64 subnets of one /24")
    used = []  # this machine's networks, but not a broad one (a /8 on eth0): a /30 route beats it
    for line in _ip("-o", "addr", "show", check=False).stdout.splitlines():
        words = line.split()
        if len(words) > 3 and words[2] == "inet":
            interface = ipaddress.ip_interface(words[3])
            used.append(interface.network if interface.network.prefixlen >= 16 else ipaddress.ip_network(interface.ip))
    candidates = [n for n in block.subnets(new_prefix=24) if not any(n.overlaps(u) for u in used)]
    if not candidates:
        raise ValueError(f"no /24 of {within} is free on this machine")
    chosen = random.choice(candidates)
    return [str(s) for s in list(chosen.subnets(new_prefix=30))[:count]]


@dataclass
class Namespace:
    """A network namespace ``name`` with one veth pair: ``host_address`` on the host's end,
    ``address`` inside. ``subnet`` is a /30 of a private 10.x range (host .1, inside .2)."""

    name: str
    subnet: str
    host_address: str = field(init=False)
    address: str = field(init=False)
    made: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        network = ipaddress.ip_network(self.subnet)
        if not (network.prefixlen == 30 and network.subnet_of(ipaddress.ip_network("10.0.0.0/8"))):
            raise ValueError(f"{self.subnet}: a /30 in 10.0.0.0/8, so that no real address is ever used")
        if len(self.host_link) > MAX_IFNAME:
            raise ValueError(f"{self.name!r} is too long for an interface name (at most {MAX_IFNAME - 2} characters)")
        first, second = list(network.hosts())
        self.host_address, self.address = str(first), str(second)

    @property
    def host_link(self) -> str:
        return f"{self.name}-h"

    @property
    def inner_link(self) -> str:
        return f"{self.name}-n"

    def create(self) -> Namespace:
        """Make the namespace and the veth pair, both ends up, loopback up inside. On a failure
        halfway, what was made is removed again."""
        self.made = True
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link)
            _ip("link", "set", self.inner_link, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            inside = ("netns", "exec", self.name, ip_binary())
            _ip(*inside, "addr", "add", f"{self.address}/30", "dev", self.inner_link)
            _ip(*inside, "link", "set", self.inner_link, "up")
            _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace. ``ip netns exec`` execs the command in place (no
        fork), so the process id is the command's own: signals and pids work as usual."""
        return [ip_binary(), "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        """Cut the namespace off: the host-side link down. Connections are not reset: what is
        sent is buffered, reads wait. The inside end loses carrier, as with a pulled cable, so a
        new connection from inside fails at once with "No route to host" (behind a failed
        switch it would time out instead)."""
        _ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_link, "up")

    def pids(self) -> list[int]:
        """The processes running inside (``ip netns pids``)."""
        return [int(p) for p in _ip("netns", "pids", self.name, check=False).stdout.split()]

    def partitioned(self) -> bool:
        return "state DOWN" in _ip("link", "show", self.host_link, check=False).stdout

    def teardown(self) -> None:
        """Remove both veth ends (deleting one removes its peer) and the namespace; idempotent.
        Processes still running inside keep the namespace alive until they exit: stop them first."""
        if not self.made:
            return
        _ip("link", "del", self.host_link, check=False)
        _ip("netns", "del", self.name, check=False)
        self.made = False

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


class TcpRelay:
    """Forward TCP connections from ``listen`` to ``target`` (host, port), byte for byte, one
    thread per direction. For a loopback-only service that a namespace must reach: listen on
    the namespace's ``host_address``. A relay on loopback whose start is delayed also makes a
    dependency "come up" at a moment a test chooses.

    When either side closes, the other is shut down too, so a server that drops a silent
    client (a missed AMQP heartbeat) closes the client's connection as it would have."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self._server = socket.create_server(listen, reuse_port=False)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"relay-{self.address[1]}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (sink, source):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for sock in (source, sink):
                if sock in self._sockets:
                    self._sockets.discard(sock)
                    sock.close()

    def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        self._server.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
