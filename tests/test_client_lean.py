"""The query path's lean HTTP lane (cipherpool/client/lean.py), against real servers on
loopback: uvicorn for what a gateway does (keep-alive, its idle timeout, a path prefix), and a
raw socket server for what a broken one does (hang up unanswered, stall, garble, keep quiet),
and an HTTPS server with a certificate made here. What it must keep from httpx: the same
request on the wire, the same errors for the same failure (the transport's retry rules read
them), the same trust for TLS, and httpx itself wherever the lane cannot stand in for it."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from cipherpool.client import lean
from cipherpool.client.lean import LeanLane, fits
from cipherpool.client.transport import BROKEN, UNSENT, Transport
from cipherpool.config.settings import Settings
from cipherpool.errors import GatewayUnavailable

BIG = bytes(range(256)) * 642  # 164,352 bytes: about a digits answer


async def echo_app(scope, receive, send):  # type: ignore[no-untyped-def]
    """Says what it was sent (method, path, query, headers, the body's length and its client's
    port), or, for /big, sends a 164 KB body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/big"):
        out, kind = BIG, b"application/octet-stream"
    else:
        seen = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            "body": len(body),
            "port": scope["client"][1],
        }
        out, kind = json.dumps(seen).encode(), b"application/json"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": out})


class Uvicorn:
    """uvicorn serving ``app`` on a loopback port, in a thread of this process (stopped by the
    test that started it)."""

    def __init__(self, app: Callable[..., object], keep_alive_s: float = 5.0, **tls: str):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="critical", timeout_keep_alive=keep_alive_s, lifespan="off", **tls)  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Uvicorn]:
    server = Uvicorn(echo_app)
    yield server
    server.stop()


class RawServer:
    """A one-thread socket server whose answer to each request ``behave(conn, request)`` writes
    (or does not): the misbehaviours a gateway's connection can show."""

    def __init__(self, behave: Callable[[socket.socket, bytes], None]):
        self.behave = behave
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.first_reads: list[bytes] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    first = conn.recv(1 << 20)
                except OSError:
                    return
                if not first:
                    return
                data = first
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
                )
                while len(body) < length:
                    more = conn.recv(1 << 20)
                    if not more:
                        return
                    body += more
                self.first_reads.append(first)
                self.requests.append(head + b"\r\n\r\n" + body)
                try:
                    self.behave(conn, data)
                except OSError:
                    return

    def stop(self) -> None:
        self.listener.close()


def ok(conn: socket.socket, _request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


def lane_call(lane: LeanLane, method: str = "GET", path: str = "/v1/queries/x", **options: object) -> httpx.Response:
    defaults: dict[str, object] = {"headers": {}, "params": None, "content": None, "connect_s": 2.0, "read_s": 5.0}
    return lane.request(method, path, **{**defaults, **options})  # type: ignore[arg-type]


def test_a_request_goes_out_as_httpx_sends_it(echo):
    """Method, the base URL's path prefix, the path, parameters written as httpx writes them,
    headers, the body; and the answer comes back whole as an httpx.Response."""
    lane = LeanLane(f"http://127.0.0.1:{echo.port}/prefix/")
    sent = {"wait": 25.0, "wait_for_worker": True, "mode": "shared", "none": None}
    response = lane_call(
        lane, "POST", "/v1/queries", params=sent, content=b"c" * 1900, headers={"Authorization": "Bearer t0k", "X-A": "b"}
    )
    via_lane = response.json()
    with httpx.Client(base_url=f"http://127.0.0.1:{echo.port}/prefix/") as client:
        via_httpx = client.post("/v1/queries", params=sent, content=b"c" * 1900, headers={"Authorization": "Bearer t0k"}).json()
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert via_lane["path"] == via_httpx["path"] == "/prefix/v1/queries"
    assert via_lane["query"] == via_httpx["query"] == "wait=25.0&wait_for_worker=true&mode=shared&none="
    assert via_lane["body"] == 1900 and via_lane["method"] == "POST"
    assert via_lane["headers"]["authorization"] == "Bearer t0k" and via_lane["headers"]["x-a"] == "b"
    assert via_lane["headers"]["host"] == via_httpx["headers"]["host"] == f"127.0.0.1:{echo.port}"
    big = lane_call(lane, "GET", "/big")
    assert big.content == BIG and big.headers["content-type"] == "application/octet-stream"
    lane.close()


def test_a_path_from_elsewhere_cannot_break_the_request_line(echo):
    """A query id comes from the gateway's answer: quoted into the path, never a new line."""
    lane = LeanLane(f"http://127.0.0.1:{echo.port}")
    seen = lane_call(lane, "GET", "/v1/queries/a b\r\nX-Evil: 1").json()
    assert seen["raw_path"] == "/v1/queries/a%20b%0D%0AX-Evil:%201"
    assert "x-evil" not in seen["headers"]
    with pytest.raises(httpx.LocalProtocolError):
        lane_call(lane, headers={"Authorization": "Bearer a\r\nX-Evil: 1"})
    lane.close()


def test_connections_are_kept_and_one_closed_by_the_gateway_is_replaced(echo):
    lane = LeanLane(f"http://127.0.0.1:{echo.port}")
    ports = {lane_call(lane).json()["port"] for _ in range(5)}
    assert len(ports) == 1  # one connection for five requests
    lane.close()
    quick = Uvicorn(echo_app, keep_alive_s=0.2)  # closes an idle connection after 0.2 s
    try:
        lane = LeanLane(f"http://127.0.0.1:{quick.port}")
        first = lane_call(lane, "POST", "/v1/queries", content=b"q").json()["port"]
        time.sleep(0.6)
        # A POST on the closed connection would fail as "broken" and never be sent again: the
        # closed one is found before the send and a new one made.
        second = lane_call(lane, "POST", "/v1/queries", content=b"q").json()["port"]
        assert second != first
    finally:
        lane.close()
        quick.stop()


def test_head_and_body_leave_in_one_write():
    """The gateway reads the whole request at its first read (it woke twice for httpx's two)."""
    server = RawServer(ok)
    lane = LeanLane(f"http://127.0.0.1:{server.port}")
    try:
        for _ in range(5):
            lane_call(lane, "POST", "/v1/queries", content=b"c" * 1900, headers={"Content-Type": "application/octet-stream"})
        assert len(server.first_reads) == 5
        assert all(
            first.endswith(b"c" * 1900) and first.startswith(b"POST /v1/queries HTTP/1.1\r\n") for first in server.first_reads
        )
        assert server.connections == 1
    finally:
        lane.close()
        server.stop()


def hang_up(conn: socket.socket, _request: bytes) -> None:
    conn.shutdown(socket.SHUT_RDWR)


def cut_body(conn: socket.socket, _request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    conn.shutdown(socket.SHUT_RDWR)


def garble(conn: socket.socket, _request: bytes) -> None:
    conn.sendall(b"garbage\r\n\r\n")


def keep_quiet(_conn: socket.socket, _request: bytes) -> None:
    time.sleep(2)  # past the read timeout


def reset(conn: socket.socket, _request: bytes) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a close that sends RST
    conn.close()


@pytest.mark.parametrize(
    ("behave", "error"),
    [
        (hang_up, httpx.RemoteProtocolError),
        (cut_body, httpx.RemoteProtocolError),
        (garble, httpx.RemoteProtocolError),
        (keep_quiet, httpx.ReadTimeout),
        (reset, httpx.TransportError),
    ],
)
def test_a_broken_answer_is_the_error_httpx_raises_for_it(behave, error):
    """The same misbehaviour, the same error from httpx and from the lane; and never one the
    transport takes for "unsent" (which would send a POST again)."""
    server = RawServer(behave)
    lane = LeanLane(f"http://127.0.0.1:{server.port}")
    try:
        with pytest.raises(error) as by_lane:
            lane_call(lane, "POST", "/v1/queries", content=b"q", read_s=0.5)
        with httpx.Client(timeout=httpx.Timeout(0.5)) as client, pytest.raises(error) as by_httpx:
            client.post(f"http://127.0.0.1:{server.port}/v1/queries", content=b"q")
        assert isinstance(by_lane.value, BROKEN + (httpx.ReadTimeout,)) and not isinstance(by_lane.value, UNSENT)
        if error is not httpx.TransportError:  # (a reset reads as either ReadError or a cut answer)
            assert type(by_lane.value) is type(by_httpx.value)
        assert len(server.requests) == 2
        # The connection that failed is not kept: the next request makes a new one.
        server.behave = ok
        assert lane_call(lane).status_code == 200
        assert server.connections == 3
    finally:
        lane.close()
        server.stop()


def test_an_informational_answer_is_not_taken_for_the_answer():
    """http.client skips a 100 only: a proxy's 103 must not pass for an empty 2xx answer."""

    def early_hints(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        ok(conn, _request)

    server = RawServer(early_hints)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            lane_call(LeanLane(f"http://127.0.0.1:{server.port}"), "POST", "/v1/queries", content=b"q")
    finally:
        server.stop()


def test_chunked_answers_closing_answers_and_header_bytes():
    """A chunked body is read whole and its connection kept; one the server says it closes is
    not kept; a header's non-ASCII bytes reach the caller as httpx gives them."""

    def chunked(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-name: caf\xe9\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    def closing(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")  # and stays open

    server = RawServer(chunked)
    lane = LeanLane(f"http://127.0.0.1:{server.port}")
    try:
        first, second = lane_call(lane), lane_call(lane)
        assert first.content == second.content == b"hello world" and server.connections == 1
        with httpx.Client() as client:
            assert first.headers["x-name"] == client.get(f"http://127.0.0.1:{server.port}/").headers["x-name"]
        server.behave = closing
        for _ in range(3):  # the kept one, then a new one each: none is kept after "close"
            lane_call(lane)
        assert server.connections == 4  # (httpx's own made one)
    finally:
        lane.close()
        server.stop()


def test_a_connection_idle_past_the_keep_alive_expiry_is_not_used_again(monkeypatch):
    """A connection can die without a word (a NAT that forgets it, a laptop asleep): as httpx,
    one idle too long is replaced before a request goes out on it."""
    monkeypatch.setattr(lean, "KEEPALIVE_EXPIRY_S", 0.2)
    server = RawServer(ok)  # keeps its connections open for ever
    lane = LeanLane(f"http://127.0.0.1:{server.port}")
    try:
        lane_call(lane)
        lane_call(lane)
        assert server.connections == 1
        time.sleep(0.4)
        lane_call(lane, "POST", "/v1/queries", content=b"q")
        assert server.connections == 2
    finally:
        lane.close()
        server.stop()


def test_a_body_past_one_write_arrives_whole(echo):
    lane = LeanLane(f"http://127.0.0.1:{echo.port}")
    size = lean.ONE_WRITE_MAX_BYTES * 3 + 7
    assert lane_call(lane, "POST", "/v1/queries/batch", content=b"b" * size).json()["body"] == size
    lane.close()


def test_a_connection_never_made_is_a_connect_error():
    port = _closed_port()
    with pytest.raises(httpx.ConnectError):
        lane_call(LeanLane(f"http://127.0.0.1:{port}"))


def test_through_the_transport_a_post_is_never_sent_twice_once_it_left(tmp_path):
    """The transport's rules read the lane's errors as httpx's: a POST whose connection broke
    after it left is not sent again; a GET is, until the gateway answers."""
    answers: list[Callable[[socket.socket, bytes], None]] = []

    def behave(conn: socket.socket, request: bytes) -> None:
        (answers.pop(0) if answers else ok)(conn, request)

    server = RawServer(behave)
    settings = Settings(data_dir=tmp_path, url=f"http://127.0.0.1:{server.port}", gateway_retry_s=5)
    transport = Transport(settings, "t0k", "no credential")
    try:
        transport.request("GET", "/v1/queries/x", query_path=True)  # heard once: retries are on
        answers.append(hang_up)
        with pytest.raises(GatewayUnavailable, match="not sent again"):
            transport.request("POST", "/v1/queries", content=b"q", query_path=True)
        answers.append(hang_up)
        assert transport.request("GET", "/v1/queries/x", query_path=True).status_code == 200
        posts = [r for r in server.requests if r.startswith(b"POST")]
        gets = [r for r in server.requests if r.startswith(b"GET")]
        assert len(posts) == 1 and len(gets) == 3
        assert all(b"authorization: Bearer t0k\r\n" in r and b"user-agent: cipherpool/" in r for r in server.requests)
    finally:
        transport.close()
        server.stop()


def test_the_transport_uses_the_lane_only_where_it_stands_in_for_httpx(tmp_path, echo, monkeypatch):
    url = f"http://127.0.0.1:{echo.port}"
    sent_by_lane: list[str] = []
    real = LeanLane.request

    def counted(self: LeanLane, method: str, path: str, **kw: object) -> httpx.Response:
        sent_by_lane.append(path)
        return real(self, method, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LeanLane, "request", counted)
    transport = Transport(Settings(data_dir=tmp_path, url=url), "t0k", "no credential")
    try:
        transport.request("POST", "/q", content=b"x", query_path=True)
        transport.request("POST", "/management", content=b"x")  # not a query's call
        transport.request("POST", "/q-stream", content=iter([b"x"]), query_path=True)  # a stream: httpx's
        transport.request("POST", "/q-json", json={"a": 1}, query_path=True)  # a JSON body: httpx's
        seen: list[str] = []
        transport.observe({"request": [lambda request: seen.append(request.url.path)], "response": []})
        transport.request("POST", "/q-hooked", content=b"x", query_path=True)  # hooks observe httpx's requests
        assert sent_by_lane == ["/q"] and seen == ["/q-hooked"]
        transport.set_credential("n3w")
        transport._http.event_hooks = {"request": [], "response": []}
        assert transport.request("GET", "/q", query_path=True).json()["headers"]["authorization"] == "Bearer n3w"
    finally:
        transport.close()
    off = Transport(Settings(data_dir=tmp_path, url=url, client_lean_http=False), "t0k", "no credential")
    assert off._lane is None
    off.close()


def test_any_proxy_keeps_httpx(monkeypatch, tmp_path):
    """The lane speaks to no proxy, and httpx's choice between a proxy and NO_PROXY has rules of
    its own: with any proxy for the scheme, a query's calls go through httpx."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert fits("http://gw.internal:8000") and fits("https://gw.internal")
    assert not fits("http://user:pw@gw.internal")  # credentials in the URL: httpx's basic auth
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert fits("http://gw.internal:8000") and not fits("https://gw.internal")
    monkeypatch.setenv("NO_PROXY", "gw.internal")
    assert not fits("https://gw.internal")
    monkeypatch.setenv("ALL_PROXY", "http://proxy:3128")
    assert not fits("http://elsewhere:8000")
    transport = Transport(Settings(data_dir=tmp_path, url="http://elsewhere:8000"), "t0k", "no credential")
    assert transport._lane is None
    transport.close()


def test_tls_trusts_what_httpx_trusts(tmp_path, monkeypatch):
    """The lane's TLS is httpx's context: a gateway whose certificate the environment's CA
    file vouches for is reached; without it, the connection is refused as httpx refuses it."""
    cert, key = _self_signed(tmp_path)
    server = Uvicorn(echo_app, ssl_certfile=str(cert), ssl_keyfile=str(key))
    url = f"https://127.0.0.1:{server.port}"
    try:
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(httpx.ConnectError):
            lane_call(LeanLane(url))
        with pytest.raises(httpx.ConnectError):
            httpx.get(url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        lane = LeanLane(url)
        assert lane_call(lane, "GET", "/big").content == BIG
        assert len({lane_call(lane).json()["port"] for _ in range(3)}) == 1  # kept under TLS too
        lane.close()
        with pytest.raises(httpx.ConnectError, match="match|mismatch"):  # the name is checked: this one is for 127.0.0.1
            lane_call(LeanLane(f"https://localhost:{server.port}"))
    finally:
        server.stop()


def test_threads_share_a_lane_each_on_a_connection_of_its_own(echo):
    lane = LeanLane(f"http://127.0.0.1:{echo.port}")
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                seen = lane_call(lane, "POST", f"/t{n}/{i}", content=b"x" * (n + 1)).json()
                assert seen["path"] == f"/t{n}/{i}" and seen["body"] == n + 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
    assert 1 <= len(lane._idle) <= lean.MAX_IDLE
    lane.close()


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
