"""The query path's HTTP: the standard library on kept connections, one write per request.

Why not httpx, which every other call uses: on a query it cost the client 1.3-1.6 ms of CPU
against 0.3-0.5 ms for ``http.client`` on the same exchange (a 1.9 KB ciphertext up, a 164 KB
answer back; ``benchmarks/client_http.py``), spread over its request model, URL merging,
cookie jar, httpcore's pool and h11's parser; and it wrote a request's head and its body in two
sends, so the gateway often woke for the head and again for the body (13 of 30 traced digits
queries). On digits the client's part of a query's time outside the compute was about a
seventh of it.

So the calls that make up a query (its submit, its long polls) go out here: the request's head
and body in one ``sendall`` on a socket with ``TCP_NODELAY``, the answer parsed by
:class:`http.client.HTTPResponse` (a kept parser: status line, headers, content length or
chunks, keep-alive), returned as an :class:`httpx.Response`. Its failures are raised as the
httpx errors httpcore raises for the same step (a connect, a send, a read), so the transport's
rules for what may be sent again (:mod:`cipherpool.client.transport`) apply unchanged: a
connection that was never made is unsent, one that broke after the request left is not.

A kept connection is used again only while it is fresh and quiet, as httpcore's: one idle
for more than 5 s (httpx's keep-alive expiry: a NAT or a laptop's sleep may have cut it without
a word) or that the gateway closed (uvicorn drops idle ones after 5 s) is replaced before the
request, so a POST does not go out on a connection that is already dead. TLS uses the context
httpx would (:func:`httpx.create_ssl_context`: the same certificates, ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` included), to the IDNA-encoded host httpx connects to.

What this cannot do as httpx would goes through httpx instead (:func:`fits`, and the
transport's choice per call): a URL with credentials in it, any proxy, a body that is not
bytes, cookies, event hooks. Its responses carry no ``request`` (nothing here reads one).
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from urllib.parse import quote, urlencode

import httpx

MAX_IDLE = 8  # kept connections per client (a client submitting from threads uses one each)
KEEPALIVE_EXPIRY_S = 5.0  # httpx's: a connection idle longer may have died without a word (a NAT, a sleep)
ONE_WRITE_MAX_BYTES = 64 * 1024  # a larger body goes in a second send rather than copied after the head
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_BAD_IN_HEADER = frozenset("\r\n\0")


def fits(url: str) -> bool:
    """Whether the lane can send to ``url`` as httpx would: plain http or https, no
    credentials in the URL, and no proxy configured at all for its scheme (httpx's choice
    between a proxy and ``NO_PROXY`` has rules of its own; the lane does not speak to proxies,
    so any proxy leaves these calls to httpx)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or parsed.userinfo:
        return False
    proxies = urllib.request.getproxies()  # what httpx reads: the environment (and the OS's elsewhere)
    return not (proxies.get(parsed.scheme) or proxies.get("all"))


class LeanLane:
    """HTTP/1.1 requests to one gateway, on up to :data:`MAX_IDLE` kept connections; safe to
    share between threads (each request holds a connection of its own)."""

    def __init__(self, url: str):
        parsed = httpx.URL(url)
        self._tls = parsed.scheme == "https"
        self._host = parsed.raw_host.decode("ascii")  # IDNA-encoded as httpx connects (and checks TLS) to it
        self._port = parsed.port or (443 if self._tls else 80)
        self._authority = parsed.netloc.decode("ascii")  # host[:port], an IPv6 address bracketed
        self._prefix = parsed.raw_path.decode("ascii").rstrip("/")  # a gateway under a path: its prefix
        self._context: ssl.SSLContext | None = None  # httpx's, made at the first TLS connect
        self._idle: list[tuple[socket.socket, float]] = []  # (connection, idle since)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, object] | None,
        content: bytes | None,
        connect_s: float | None,
        read_s: float | None,
    ) -> httpx.Response:
        """One request and its whole answer. ``read_s`` bounds each send and read (httpx's
        write and read timeouts alike), ``connect_s`` a new connection's connect and TLS."""
        head = self._head(method, path, headers, params, content)
        sock = self._take(connect_s)
        sent = True
        try:
            sock.settimeout(read_s)
            try:
                self._send(sock, head, content)
            except _SendFailed as failed:
                sent = False
                try:
                    response, body = _receive(sock, method)
                except httpx.TransportError:
                    raise httpx.WriteError(str(failed.cause)) from failed.cause
            else:
                response, body = _receive(sock, method)
        except BaseException:
            sock.close()
            raise
        if response.will_close or not sent:
            sock.close()
        else:
            self._keep(sock)
        # Header bytes as they came (latin-1 is how http.client decoded them), as httpx keeps them.
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.getheaders()]
        return httpx.Response(response.status, headers=raw, content=body)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for sock, _since in idle:
            sock.close()

    def _head(
        self, method: str, path: str, headers: Mapping[str, str], params: Mapping[str, object] | None, content: bytes | None
    ) -> bytes:
        target = self._prefix + quote(path, safe=_PATH_SAFE)
        if params:
            target += "?" + urlencode([(name, _primitive(value)) for name, value in params.items()])
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._authority}"]
        for name, value in headers.items():
            if _BAD_IN_HEADER.intersection(name) or _BAD_IN_HEADER.intersection(value):
                raise httpx.LocalProtocolError(f"Illegal header value in {name!r}")  # as h11 refuses it
            lines.append(f"{name}: {value}")
        if content is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(content or b'')}")
        try:
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError as exc:  # a credential no header can carry as it is
            raise httpx.LocalProtocolError(f"A header value is not latin-1: {exc}") from None

    def _take(self, connect_s: float | None) -> socket.socket:
        """A kept connection that is fresh and that the gateway has not closed, else a new one."""
        if self._pid != os.getpid():  # a forked child: its parent's lock and sockets are not its own
            idle, self._idle, self._lock, self._pid = self._idle, [], threading.Lock(), os.getpid()
            for sock, _since in idle:
                sock.close()  # this process's copies only: the parent's connections stay open
        now = time.monotonic()
        with self._lock:
            while self._idle:
                sock, since = self._idle.pop()
                if now - since <= KEEPALIVE_EXPIRY_S and not _readable(sock):
                    return sock
                sock.close()  # expired, closed by the gateway, or sent what nobody asked for
        return self._connect(connect_s)

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE and self._pid == os.getpid() and not self._closed:
                self._idle.append((sock, time.monotonic()))
                return
        sock.close()

    def _connect(self, timeout: float | None) -> socket.socket:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self._host)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:  # ssl.SSLError is one: a certificate refused, a failed handshake
            sock.close()
            raise httpx.ConnectError(str(exc)) from exc
        return sock

    def _tls_context(self) -> ssl.SSLContext:
        """httpx's context (its certificates, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` included),
        speaking HTTP/1.1 as httpcore offers it."""
        if self._context is None:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._context = context
        return self._context

    @staticmethod
    def _send(sock: socket.socket, head: bytes, content: bytes | None) -> None:
        try:
            if content and len(content) > ONE_WRITE_MAX_BYTES:
                sock.sendall(head)
                sock.sendall(content)
            else:
                sock.sendall(head + content if content else head)
        except TimeoutError as exc:
            raise httpx.WriteTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            # As httpcore: a gateway (or a proxy) may answer early and close before the whole
            # body is in (a 413, a 401): its answer, if there is one, is the result.
            raise _SendFailed(exc) from exc


class _SendFailed(Exception):
    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause


def _receive(sock: socket.socket, method: str) -> tuple[http.client.HTTPResponse, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        if 100 <= response.status < 200:  # http.client skips a 100 only; a 103 from a proxy is not the answer
            raise httpx.RemoteProtocolError(f"An informational response ({response.status}) where the answer was due.")
        return response, response.read()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except http.client.RemoteDisconnected as exc:  # (a ConnectionResetError too): no answer at all
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from exc
    except http.client.HTTPException as exc:  # a cut body, a garbled status line or header
        raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc)) from exc
    finally:
        response.close()  # its file only: the socket stays, to be kept or closed by the caller


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: the gateway closed it (EOF) or sent
    what nobody asked for; either way it is not to be used again. (``poll``, not ``select``:
    any descriptor number.)"""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile
        return True


def _primitive(value: object) -> str:
    """A query parameter's value as httpx writes it (``true``, not ``True``)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "" if value is None else str(value)
