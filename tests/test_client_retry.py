"""Clients ride out a gateway restart (issue 21): idempotent calls and long polls retry while
the gateway is away, within their own timeout; a POST that may have reached it is never sent
twice. The restart cases run against a real HTTP server process (a minimal gateway-like ASGI
app under uvicorn, on a free loopback port) that the tests kill and start again by its own
pid; the backoff schedule and the retry rules run against httpx's MockTransport."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cipherpool.client import query as query_module
from cipherpool.client import transport as transport_module
from cipherpool.client.management import ManagementClient
from cipherpool.client.query import QueryClient, QueryHandle
from cipherpool.client.transport import RETRY_FIRST_S, RETRY_MAX_S, Transport
from cipherpool.config.settings import Settings
from cipherpool.errors import GatewayUnavailable, ModelNotFound, NoWorkerUp, QueryTimeout, RemoteError
from cipherpool.stack.supervisor import free_port

QUERY_ID = str(uuid.uuid4())
OCTET = {"Content-Type": "application/octet-stream"}

# The "platform" state lives in files of the server's directory, so that it outlives a
# restart of the server as a query outlives the gateway's (broker and result backend keep it).
FAKE_GATEWAY = """
import asyncio, json, os, pathlib

STATE = pathlib.Path(os.environ["FAKE_GATEWAY_DIR"])
LONG_POLL_S = 0.3


def count(name):
    with open(STATE / name, "a") as f:
        f.write("x")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    method, path = scope["method"], scope["path"]
    if method == "POST" and path == "/v1/queries":
        count("posts")
        if (STATE / "crash").exists():  # dies with the request read and unanswered
            os._exit(1)
        status, headers, out = 202, [(b"content-type", b"application/json")], json.dumps(
            {"id": "QUERY_ID", "status": "queued"}).encode()
    elif method == "GET" and path.startswith("/v1/queries/"):
        count("gets")
        wait = min(float(dict(p.split("=") for p in scope["query_string"].decode().split("&") if p).get("wait", 0)),
                   LONG_POLL_S)
        waited = 0.0
        while not (STATE / "ready").exists() and waited < wait:
            await asyncio.sleep(0.05)
            waited += 0.05
        if (STATE / "ready").exists():
            status, out = 200, b"encrypted output"
            headers = [(b"content-type", b"application/octet-stream"), (b"x-cipherpool-node", b"node-1"),
                       (b"x-cipherpool-model-version", b"1"), (b"x-cipherpool-timings", b"{}")]
        else:
            status, headers = 202, [(b"content-type", b"application/json")]
            out = json.dumps({"id": path.rsplit("/", 1)[1], "status": "queued"}).encode()
    else:
        status, headers, out = 404, [(b"content-type", b"application/json")], b'{"code": "not_found", "message": "?"}'
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": out})
""".replace("QUERY_ID", QUERY_ID)


@dataclass
class FakeGateway:
    """The server process; ``start``/``kill`` by its own pid, on one port across restarts."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(self.root),
                "fake_gateway:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "critical",
            ],
            env={**os.environ, "FAKE_GATEWAY_DIR": str(self.root)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the fake gateway died at its start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the fake gateway did not start")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process:
            self.process.wait(5)

    def count(self, name: str) -> int:
        path = self.root / name
        return len(path.read_text()) if path.exists() else 0


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    root = tmp_path / "gateway"
    root.mkdir()
    (root / "fake_gateway.py").write_text(textwrap.dedent(FAKE_GATEWAY))
    gw = FakeGateway(root)
    try:
        yield gw
    finally:
        gw.kill()


def in_background(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def settings_for(tmp_path: Path, url: str, **over: float) -> Settings:
    return Settings(data_dir=tmp_path / "data", url=url, long_poll_s=0.3, **over)


def mocked_settings(tmp_path: Path, **over: float) -> Settings:
    """For a client whose httpx transport the test replaces with a MockTransport: a query's calls
    through httpx too, not on the lean lane (which opens sockets of its own: tested against
    real servers above and in tests/test_client_lean.py)."""
    return Settings(data_dir=tmp_path / "data", url="http://gateway", long_poll_s=0.3, client_lean_http=False, **over)


# --- against a real server that restarts ------------------------------------------------------------


def test_a_long_poll_rides_out_a_gateway_restart(gateway, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cipherpool.client")
    gateway.start()
    client = QueryClient("cpt_test", settings=settings_for(tmp_path, gateway.url))
    handle = QueryHandle(client, QUERY_ID, time.time())

    def restart() -> None:
        time.sleep(0.5)  # polls under way (one is held by the server when it dies)
        gateway.kill()
        time.sleep(1.0)  # connections refused meanwhile
        gateway.start()
        (gateway.root / "ready").touch()  # the node's answer, kept by the platform

    restarter = in_background(restart)
    started = time.monotonic()
    assert handle.result(timeout=15) == b"encrypted output"
    restarter.join(10)
    assert time.monotonic() - started < 8
    assert handle.version == 1 and not hasattr(handle, "node")  # an end user is told no node name
    records = [r for r in caplog.records if r.name == "cipherpool.client"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO], "one outage, logged once, then its end"
    assert "unreachable" in records[0].getMessage() and "answers again" in records[1].getMessage()
    client.close()


@pytest.mark.parametrize("query_path", [False, True], ids=["httpx", "lean-lane"])
def test_a_post_cut_off_mid_request_is_not_sent_again(gateway, tmp_path, query_path):
    (gateway.root / "crash").touch()
    gateway.start()
    transport = Transport(settings_for(tmp_path, gateway.url, gateway_retry_s=10), "cpt_test", "no token")

    def restart_after_the_crash() -> None:  # a retry would land on the restarted server, and be counted
        assert gateway.process is not None
        gateway.process.wait(10)
        (gateway.root / "crash").unlink()
        gateway.start()

    restarter = in_background(restart_after_the_crash)
    started = time.monotonic()
    with pytest.raises(GatewayUnavailable, match="not sent again"):
        transport.request("POST", "/v1/queries", content=b"ciphertext", headers=OCTET, query_path=query_path)
    assert time.monotonic() - started < 8, "not retried: raised as soon as the connection broke, not after 10 s"
    restarter.join(10)
    time.sleep(0.3)
    assert gateway.count("posts") == 1, "the submit reached the server once"
    transport.close()


@pytest.mark.parametrize("query_path", [False, True], ids=["httpx", "lean-lane"])
def test_a_post_refused_before_it_was_sent_is_retried(gateway, tmp_path, query_path):
    """Also: the connection the GET left kept dies with the server, and is not used again."""
    transport = Transport(settings_for(tmp_path, gateway.url, gateway_retry_s=10), "cpt_test", "no token")
    gateway.start()
    transport.request("GET", f"/v1/queries/{QUERY_ID}", query_path=query_path)
    gateway.kill()
    starter = in_background(lambda: (time.sleep(0.7), gateway.start()))
    response = transport.request("POST", "/v1/queries", content=b"ciphertext", headers=OCTET, query_path=query_path)
    starter.join(10)
    assert response.status_code == 202 and gateway.count("posts") == 1
    transport.close()


def test_retries_stop_within_the_calls_timeout(gateway, tmp_path):
    # Upper bounds far from the real times (a loaded machine is slow) and still far below
    # what a wrong budget would take: 60 s, 300 s.
    patient = QueryClient("cpt_test", settings=settings_for(tmp_path, gateway.url, gateway_retry_s=60))
    brief = QueryClient("cpt_test", settings=settings_for(tmp_path, gateway.url, gateway_retry_s=1.0))
    waiting, asking = QueryHandle(patient, QUERY_ID, time.time()), QueryHandle(brief, QUERY_ID, time.time())
    gateway.start()
    assert waiting.status() == asking.status() == "queued"
    gateway.kill()  # and it never comes back
    started = time.monotonic()
    with pytest.raises(GatewayUnavailable, match="gave up on GET"):
        waiting.result(timeout=1.5)
    assert 1.4 < time.monotonic() - started < 30, "its own timeout, not gateway_retry_s (60 s)"
    started = time.monotonic()
    with pytest.raises(GatewayUnavailable):
        asking.status()  # no timeout of its own: gateway_retry_s
    assert 0.9 < time.monotonic() - started < 30, "gateway_retry_s (1 s), not query_timeout_s (300 s)"
    patient.close()
    brief.close()


# --- the rules and the schedule, against MockTransport ----------------------------------------------


class FakeTime:
    """Stands for the transport's ``time``: sleeps advance a clock and are recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(transport_module, "time", fake)
    monkeypatch.setattr(query_module, "time", fake)
    return fake


def scripted(
    tmp_path: Path, answers: list[httpx.Response | type[httpx.TransportError]], **over: float
) -> tuple[Transport, list[httpx.Request]]:
    """A transport whose gateway answers (or fails) as scripted, then 200s; and what it was sent."""
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/health":
            return httpx.Response(200, json={})
        sent.append(request)
        answer = answers.pop(0) if answers else httpx.Response(200, json={})
        if isinstance(answer, httpx.Response):
            return answer
        raise answer("scripted", request=request)

    transport = Transport(mocked_settings(tmp_path, **over), "cpt_test", "no token")
    transport._http._transport = httpx.MockTransport(handle)
    transport.request("GET", "/v1/health")  # the gateway was there: what follows is an outage
    return transport, sent


def typed(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": code})


def test_the_backoff_doubles_with_jitter_up_to_its_cap_within_the_budget(tmp_path, clock):
    transport, sent = scripted(tmp_path, [httpx.ConnectError] * 100, gateway_retry_s=10)
    with pytest.raises(GatewayUnavailable, match="gave up"):
        transport.request("GET", "/v1/models")
    assert len(sent) == len(clock.sleeps) + 1
    for retry, pause in enumerate(clock.sleeps[:-1], start=1):  # the last one is cut to the deadline
        nominal = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (retry - 1))
        assert 0.5 * nominal <= pause <= nominal
    assert sum(clock.sleeps) == pytest.approx(10)
    assert len(set(clock.sleeps)) > 3, "jittered"


def test_an_idempotent_call_retries_a_connection_lost_before_its_answer(tmp_path, clock):
    for method in ("GET", "PUT", "DELETE"):
        transport, sent = scripted(tmp_path, [httpx.ReadError, httpx.RemoteProtocolError])
        assert transport.request(method, "/v1/x", content=b"body").status_code == 200
        assert len(sent) == 3


def test_a_post_is_retried_only_when_it_was_never_sent(tmp_path, clock):
    transport, sent = scripted(tmp_path, [httpx.ConnectError, httpx.ConnectTimeout])
    assert transport.request("POST", "/v1/queries", content=b"ct").status_code == 200 and len(sent) == 3
    for lost in (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        transport, sent = scripted(tmp_path, [lost])
        with pytest.raises(GatewayUnavailable, match="not sent again"):
            transport.request("POST", "/v1/queries", content=b"ct")
        assert len(sent) == 1
    transport, sent = scripted(tmp_path, [httpx.Response(503, text="<html>upstream gone</html>")])
    with pytest.raises(RemoteError):  # a proxy may have forwarded it before the gateway went
        transport.request("POST", "/v1/queries", content=b"ct")
    assert len(sent) == 1


def test_a_stream_is_not_sent_again_once_spent(tmp_path, clock):
    transport, sent = scripted(tmp_path, [httpx.WriteError])
    with pytest.raises(GatewayUnavailable, match="not sent again"):
        transport.request("PUT", "/v1/uploads", content=iter([b"a", b"b"]))
    assert len(sent) == 1


def test_which_answers_are_an_outage_and_which_are_answers(tmp_path, clock):
    outage = [
        httpx.Response(502, text="bad gateway"),
        httpx.Response(503, text=""),
        httpx.Response(504, text="x"),
        typed(503, "broker_unavailable"),
        typed(503, "database_unavailable"),
    ]
    transport, sent = scripted(tmp_path, list(outage))
    assert transport.request("GET", "/v1/models").status_code == 200 and len(sent) == 6
    for answer, error in ((typed(503, "no_worker_up"), NoWorkerUp), (typed(502, "remote_error"), RemoteError)):
        transport, sent = scripted(tmp_path, [answer])
        with pytest.raises(error):
            transport.request("GET", "/v1/models")
        assert len(sent) == 1, f"{error.__name__} is the platform's answer, raised at once"


def test_a_proxys_retry_after_is_honoured(tmp_path, clock):
    transport, _ = scripted(tmp_path, [httpx.Response(503, headers={"Retry-After": "3"}, text="draining")])
    transport.request("GET", "/v1/models")
    assert clock.sleeps == [3.0]


def test_a_retried_delete_that_finds_nothing_says_why(tmp_path, clock):
    transport, _ = scripted(tmp_path, [httpx.ReadError, typed(404, "model_not_found")])
    with pytest.raises(ModelNotFound) as raised:
        transport.request("DELETE", "/v1/models/m")
    assert any("may have deleted it" in note for note in raised.value.__notes__)


def test_rate_limits_are_still_retried_after_retry_after(tmp_path, clock):
    transport, sent = scripted(
        tmp_path, [httpx.Response(429, headers={"Retry-After": "2"}, json={"code": "rate_limited", "message": "slow"})]
    )
    assert transport.request("POST", "/v1/queries", content=b"ct").status_code == 200
    assert len(sent) == 2 and clock.sleeps == [2.0]


def test_an_outage_is_logged_once_however_many_calls_and_tries(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="cipherpool.client")
    failures: list[httpx.Response | type[httpx.TransportError]] = [httpx.ConnectError] * 100
    transport, _ = scripted(tmp_path, failures, gateway_retry_s=5)
    for _ in range(2):  # two calls give up in the same outage
        with pytest.raises(GatewayUnavailable):
            transport.request("GET", "/v1/models")
    failures.clear()  # the gateway is back
    transport.request("GET", "/v1/models")
    levels = [r.levelno for r in caplog.records if r.name == "cipherpool.client"]
    assert levels == [logging.WARNING, logging.INFO]


def test_no_budget_means_no_retry(tmp_path, clock):
    transport, sent = scripted(tmp_path, [httpx.ConnectError], gateway_retry_s=0)
    with pytest.raises(GatewayUnavailable, match="Cannot reach the gateway at http://gateway"):
        transport.request("GET", "/v1/models")
    assert len(sent) == 1 and clock.sleeps == []


def test_a_gateway_that_never_answered_is_not_waited_for(tmp_path, clock, caplog):
    """A wrong URL or a stack not up, more likely than a restart: the error comes at once."""
    transport = Transport(mocked_settings(tmp_path), "cpt_test", "no token")
    transport._http._transport = httpx.MockTransport(
        lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused", request=request))
    )
    with pytest.raises(GatewayUnavailable, match=r"Cannot reach the gateway at http://gateway \(ConnectError"):
        transport.request("GET", "/v1/models")
    assert clock.sleeps == [] and not caplog.records


def test_the_management_client_shares_the_retries(tmp_path, clock):
    client = ManagementClient("cpk_test", settings=mocked_settings(tmp_path))
    answers: list[httpx.Response | type[httpx.TransportError]] = [httpx.ConnectError, httpx.ReadError]

    def handle(request: httpx.Request) -> httpx.Response:
        if answers:
            raise answers.pop(0)("scripted", request=request)
        return httpx.Response(200, json=[])

    client._t._http._transport = httpx.MockTransport(handle)
    client._t._heard = True  # as after any earlier answer
    assert client.list_models() == []
    client.close()


@pytest.mark.parametrize("away", ["DELETE", "GET"], ids=["withdraw", "explain"])
def test_after_a_timeout_withdrawing_and_explaining_end_soon_after_it(tmp_path, clock, away):
    """A result's timeout of 10 s, then the gateway goes: withdrawing the query, then asking
    whether any worker serves the model, retry until the timeout plus a small grace, each try
    waiting no longer; not gateway_retry_s (30 s) each, which made result(timeout=10) last 70 s."""
    client = QueryClient("cpt_test", settings=mocked_settings(tmp_path, gateway_retry_s=30))
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.method == "GET" and request.url.path == f"/v1/queries/{QUERY_ID}":
            clock.now += float(request.url.params["wait"])  # a long poll that waits its time
            return httpx.Response(202, json={"id": QUERY_ID, "status": "queued"})
        if request.method != away:
            return httpx.Response(204)  # the withdrawal, while the gateway answers
        raise httpx.ConnectError("refused", request=request)  # away from then on

    client._t._http._transport = httpx.MockTransport(handle)
    client._t._heard = True  # as after any earlier answer
    handle_ = QueryHandle(client, QUERY_ID, clock.now)
    started = clock.now
    with pytest.raises(GatewayUnavailable if away == "DELETE" else QueryTimeout):
        handle_.result(timeout=10)
    assert clock.now - started == pytest.approx(10 + query_module.AFTER_TIMEOUT_GRACE_S)
    path = f"/v1/queries/{QUERY_ID}" if away == "DELETE" else "/v1/client/model"
    tries = [r for r in sent if (r.method, r.url.path) == (away, path)]
    assert len(tries) > 1, "retried within the grace"
    assert all(r.extensions["timeout"]["read"] <= query_module.AFTER_TIMEOUT_GRACE_S for r in tries)
    client.close()
