"""The front door's security properties, proved on a real stack (Redis with password and ACL,
a control worker, two pool nodes, the gateway under uvicorn) with a real concrete-ml model:

* no secret (API key, access token, the client's secret key, plaintext in or out) reaches
  Redis (commands, pub/sub, stored values, AOF), the logs or the database;
* the broker refuses anyone without its password, and the ACL refuses admin commands;
* a zip bomb sent with a wrong key costs nothing, and one sent with a valid key is refused
  by its declared size without being inflated;
* oversize bodies are refused with 413 before anything is stored;
* request rates per token are bounded (429 + Retry-After), and the client copes;
* a revoked token stops working within the auth cache's TTL (<= 5 s);
* the files the platform and its client write are private;
* a query whose token fails authorisation never reaches a node.

Everything runs on loopback; every process is started by the stack and stopped by its pid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import stat
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest
import redis

from cipherpool import names
from cipherpool.api.schemas import WorkerStats
from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import KIB, MIB, Settings
from cipherpool.errors import InvalidToken
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

pytestmark = pytest.mark.integration

TOKEN_RATE_PER_S = 20.0  # low enough to hit from a test, high enough for the flows here
CIPHERTEXT_CAP = 64 * KIB  # a breast-cancer ciphertext is about 1 KB
KEY_CAP = 64 * KIB  # its evaluation key is 64 bytes
UNZIPPED_CAP = 100 * MIB
AUTH_CACHE_TTL_S = 2.0
BOMB_UNZIPPED = 1024 * MIB
QUERY_TASK = names.QUERY_TASK.encode()  # as it appears in a captured message


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from cipherpool.examples import train_breast_cancer

    return train_breast_cancer(tmp_path_factory.mktemp("front-door-model") / "cancer")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("front-door") / "platform",
        token_rate_per_s=TOKEN_RATE_PER_S,
        max_ciphertext_bytes=CIPHERTEXT_CAP,
        max_evaluation_key_bytes=KEY_CAP,
        max_deployment_unzipped_bytes=UNZIPPED_CAP,
        auth_cache_ttl_s=AUTH_CACHE_TTL_S,
        query_timeout_s=120.0,
        # Blobs and uploads in the broker's Redis: these tests watch every Redis command (and
        # scan Redis keys) to prove that no unauthenticated or oversize body was stored.
        blob_store="redis",
    )
    # Two nodes: one serves the module's shared model, the other the secret scan's own flow.
    with EmbeddedStack(settings, StackOptions(nodes=2, beat=False, flower=False)) as s:
        yield s


@dataclass
class Served:
    api_key: str
    mc: ManagementClient
    model: str
    token: str
    qc: QueryClient
    key_dir: Path
    node: str  # the supervisor child serving the model (node1, node2)


@pytest.fixture(scope="module")
def served(stack, example, tmp_path_factory):
    """The shared model: deployed, active, served by one node; a client with uploaded keys."""
    api_key = stack.create_account("front-door")
    mc = ManagementClient(api_key, settings=stack.client_settings)
    mc.deploy_model("shared", example.path)
    mc.activate_model("shared")
    worker = mc.start_worker("shared")
    token = mc.create_token("shared-user", model="shared")
    key_dir = tmp_path_factory.mktemp("front-door-client") / "keys"  # made by the client
    qc = QueryClient(token, settings=stack.client_settings, key_dir=key_dir)
    qc.generate_keys()
    qc.upload_evaluation_keys()
    yield Served(api_key, mc, "shared", token, qc, key_dir, worker.node.split("@")[0])
    qc.close()
    mc.close()


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """1 GiB of zeros in one deflated member: about 1 MB on the wire."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("server.bin", "w", force_zip64=True) as member:
        chunk = bytes(4 * MIB)
        for _ in range(BOMB_UNZIPPED // len(chunk)):
            member.write(chunk)
    data = buf.getvalue()
    assert len(data) < 2 * MIB
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sum(i.file_size for i in zf.infolist()) == BOMB_UNZIPPED
    return data


# ---------------------------------------------------------------------------------------
# helpers


def child(stack: EmbeddedStack, name: str):
    return next(c for c in stack.supervisor.children if c.name == name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def broker(stack: EmbeddedStack) -> redis.Redis:
    return redis.Redis.from_url(stack.broker_url, socket_timeout=30)


def keys_like(stack: EmbeddedStack, *patterns: str) -> set[bytes]:
    r = broker(stack)
    try:
        return {k for p in patterns for k in r.scan_iter(match=p, count=1000)}
    finally:
        r.close()


def http(stack: EmbeddedStack) -> httpx.Client:
    return httpx.Client(base_url=stack.gateway_url, timeout=httpx.Timeout(60.0, connect=5.0))


def bearer(credential: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}", **extra}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.json()["code"] == code, response.text[:300]


def without_password(url: str, password: str | None = None) -> str:
    parts = urlsplit(url)
    auth = f":{password}@" if password else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{parts.hostname}:{parts.port}"))


def token_id(mc: ManagementClient, name: str) -> str:
    [found] = [t.id for t in mc.list_tokens() if t.name == name]
    return found


def node_stats(mc: ManagementClient, model: str) -> WorkerStats:
    [stats] = mc.worker_stats(model)
    return stats


class Memory:
    """Resident memory of a process: the baseline now, and the peak since (the kernel's
    high-water mark is reset here when /proc allows it, else the current RSS is used)."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.peak_tracked = True
        except OSError:
            self.peak_tracked = False
        self.baseline = self._field("VmRSS")

    def _field(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {name} for pid {self.pid}")

    def growth(self) -> int:
        now = self._field("VmHWM" if self.peak_tracked else "VmRSS")
        return max(now, self._field("VmRSS")) - self.baseline


# ---- what Redis sees ----------------------------------------------------------------------

_MONITOR_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(arg: bytes) -> bytes:
    def one(m: re.Match) -> bytes:
        e = m.group(1)
        if e[:1] == b"x" and len(e) == 3:
            return bytes([int(e[1:], 16)])
        return _ESCAPES.get(e, e)

    return _ESCAPE.sub(one, arg)


def parse_monitor_line(raw: bytes) -> list[bytes]:
    """``1700000000.123456 [0 127.0.0.1:5555] "SET" "k" "\\x00..."`` -> [b"SET", b"k", b"\\x00..."]:
    the exact bytes of every argument (Redis writes them escaped, as sdscatrepr does)."""
    _, rest = raw.split(b" ", 1)
    args = rest[rest.index(b"] ") + 2 :]
    return [_unescape(m.group(1)) for m in _MONITOR_ARG.finditer(args)]


class RedisCapture:
    """Everything Redis is told between enter and stop(): MONITOR on a connection of its own
    (read raw, so binary arguments come back byte for byte) and PSUBSCRIBE * on another."""

    def __init__(self, url: str):
        self.url = url
        self.marker = f"front-door-capture-end-{uuid.uuid4().hex}".encode()
        self.commands: list[list[bytes]] = []
        self.messages: list[tuple[bytes, bytes]] = []
        self._errors: list[BaseException] = []

    def __enter__(self) -> RedisCapture:
        self._client = redis.Redis.from_url(self.url)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()  # MONITOR sent and acknowledged: from here every command is seen
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("*")
        confirm = self._pubsub.get_message(timeout=10)
        assert confirm and confirm["type"] == "psubscribe", confirm
        self._threads = [
            threading.Thread(target=self._read_monitor, daemon=True),
            threading.Thread(target=self._read_pubsub, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if not (self._threads[0].is_alive() or self._threads[1].is_alive()):
            return
        if exc_type is None:
            self.stop()
            return
        try:  # the block failed: end quietly, its own error is the one to see
            self.stop()
        except Exception:  # noqa: BLE001
            pass

    def _read_monitor(self) -> None:
        try:
            while True:
                args = parse_monitor_line(self._monitor.connection.read_response())
                self.commands.append(args)
                if len(args) == 2 and args[0].upper() == b"ECHO" and args[1] == self.marker:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._errors.append(exc)

    def _read_pubsub(self) -> None:
        try:
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                message = self._pubsub.get_message(timeout=1.0)
                if message and message["type"] == "pmessage":
                    self.messages.append((message["channel"], message["data"]))
                    if message["channel"] == self.marker:
                        return
        except BaseException as exc:  # noqa: BLE001
            self._errors.append(exc)

    def stop(self) -> None:
        """End the capture: a marker command and a marker message, each seen last."""
        self._client.echo(self.marker)
        self._client.publish(self.marker, b"end")
        for t in self._threads:
            t.join(30)
        alive = [t for t in self._threads if t.is_alive()]
        self._monitor.__exit__(None, None, None)
        self._pubsub.close()
        self._client.close()
        assert not self._errors, self._errors
        assert not alive, "the capture did not see its own end marker"

    def blobs(self) -> list[tuple[str, bytes]]:
        return [("redis MONITOR", b"\n".join(b" ".join(c) for c in self.commands))] + [
            ("redis pub/sub", b"\n".join(ch + b" " + data for ch, data in self.messages))
        ]

    def published_tasks(self, task: bytes) -> list[list[bytes]]:
        """Pushes onto a Redis list (how kombu publishes) of a message for ``task``."""
        return [c for c in self.commands if c and c[0].upper() in (b"LPUSH", b"RPUSH") and any(task in a for a in c[2:])]


def redis_values(stack: EmbeddedStack) -> list[tuple[str, bytes]]:
    """Every key of the platform's Redis and its value, whatever its type."""
    r = broker(stack)
    found = []
    try:
        for key in r.scan_iter(count=1000):
            kind = r.type(key).decode()
            if kind == "string":
                parts = [r.get(key) or b""]
            elif kind == "list":
                parts = r.lrange(key, 0, -1)
            elif kind == "hash":
                parts = [b for kv in r.hgetall(key).items() for b in kv]
            elif kind == "set":
                parts = list(r.smembers(key))
            elif kind == "zset":
                parts = r.zrange(key, 0, -1)
            elif kind == "none":  # expired meanwhile
                parts = []
            else:
                raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
            found.append((f"redis key {key.decode(errors='replace')}", key + b"\n" + b"\n".join(parts)))
    finally:
        r.close()
    return found


def files_under(root: Path, pattern: str = "*") -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(Path(root).glob(pattern)) if p.is_file()]


_BASE64 = re.compile(rb"[A-Za-z0-9+/]{24,}={0,2}")
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2}){16,}")


def expanded(corpus: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The corpus and what its base64 and hex runs decode to: kombu sends message bodies in
    base64 and Celery logs results with bytes in hex, so a secret would hide in them there."""
    out = list(corpus)
    for source, blob in corpus:
        decoded = []
        for m in _BASE64.finditer(blob):
            run = m.group()
            if not run.endswith(b"="):
                run = run[: len(run) - len(run) % 4]
            try:
                decoded.append(base64.b64decode(run))
            except (binascii.Error, ValueError):
                pass
        decoded += [bytes.fromhex(m.group().decode()) for m in _HEX.finditer(blob)]
        if decoded:
            out.append((f"{source} (base64/hex decoded)", b"\n".join(decoded)))
    return out


def leaks(corpus: list[tuple[str, bytes]], needles: dict[str, bytes]) -> list[str]:
    return [f"{what} found in {source}" for what, needle in needles.items() for source, blob in corpus if needle in blob]


def found_in(corpus: list[tuple[str, bytes]], needle: bytes) -> list[str]:
    return [source for source, blob in corpus if needle in blob]


# ---- what counts as a secret --------------------------------------------------------------


def secret_key_needles(key_dir: Path) -> dict[str, bytes]:
    """Byte patterns of the client's secret key(s) as concrete stores them under key_dir.

    concrete's key-set cache writes ``secretKey_<n>`` files (the evaluation keys of a model
    with bootstrapping would be beside them, as ``bootstrapKey_``/``keyswitchKey_``): a Cap'n
    Proto header, then the LWE secret key, one little-endian u64 per key bit (0 or 1). A
    32-byte window of that holds 4 key bits and would match any run of small integers, so
    the windows here are 512 bytes (64 key bits) each, in hex too, and 128 key bits packed
    into 16 bytes or spread over 128; base64 forms of the file as well (the scan decodes
    base64 and hex runs it finds, besides)."""
    files = sorted(p for p in key_dir.rglob("*") if p.is_file() and p.name.startswith("secretKey"))
    listing = sorted(str(p.relative_to(key_dir)) for p in key_dir.rglob("*"))
    assert files, f"no secretKey_* file under {key_dir}: {listing}"
    needles = {}
    for path in files:
        data = path.read_bytes()
        n = 0  # key bits at the end of the file
        while (n + 1) * 8 <= len(data) and int.from_bytes(data[len(data) - 8 * (n + 1) : len(data) - 8 * n], "little") <= 1:
            n += 1
        assert n >= 512, f"{path} does not end in a binary LWE key ({n} u64 of 0/1)"
        body = data[len(data) - 8 * n :]
        bits = np.frombuffer(body, "<u8").astype(np.uint8)
        assert 0.3 < bits.mean() < 0.7, "not a uniform binary secret key"
        for start in (0, n // 3, 2 * n // 3, n - 128):
            window = bits[start : start + 128]
            assert 32 <= int(window.sum()) <= 96, "a low-entropy window would prove nothing"
            raw = body[8 * start : 8 * start + 512]  # the first 64 of these bits, as stored
            tag = f"{path.name}[bit {start}]"
            needles[f"{tag} raw"] = raw
            needles[f"{tag} hex"] = raw.hex().encode()
            needles[f"{tag} as bytes"] = window.tobytes()
            needles[f"{tag} packed"] = np.packbits(window).tobytes()
            needles[f"{tag} packed (little)"] = np.packbits(window, bitorder="little").tobytes()
        encoded = base64.b64encode(data)
        for start in range(len(encoded) // 3 // 4 * 4, len(encoded) - 400, len(encoded) // 4 // 4 * 4):
            needles[f"{path.name} base64[{start}]"] = encoded[start : start + 400]
    return needles


def plaintext_needles(label: str, x: np.ndarray) -> dict[str, bytes]:
    x = np.asarray(x, dtype=np.float64).ravel()
    values = x.tolist()
    forms = {
        "float64": x.astype("<f8").tobytes(),
        "float64 big-endian": x.astype(">f8").tobytes(),
        "float32": x.astype("<f4").tobytes(),
        "list repr": str(values).encode(),
        "json": json.dumps(values).encode(),
        "numpy str (first line)": str(x).splitlines()[0].encode(),
        "numpy repr (first line)": repr(x).splitlines()[0].encode(),
        "space separated": " ".join(map(repr, values)).encode(),
        "comma separated": ",".join(map(repr, values)).encode(),
    }
    # Single values only where they are distinctive: a short decimal like 0.0064 could be
    # the start of a logged duration, and a round one's float64 bytes are mostly zeros.
    for i, v in enumerate(values):
        if len(repr(v)) >= 8:
            forms[f"value {i} float64"] = np.float64(v).tobytes()
        if len(repr(v)) >= 12:
            forms[f"value {i} repr"] = repr(v).encode()
    for i in range(0, len(values) - 2, 3):  # three neighbours, as a truncated log line would show them
        triple = ", ".join(map(repr, values[i : i + 3]))
        if len(triple) >= 18:
            forms[f"values {i}..{i + 2}"] = triple.encode()
    return {f"{label} {k}": v for k, v in forms.items() if len(v) >= 8}


def redis_password(stack: EmbeddedStack) -> str:
    return (stack.data_dir / "redis" / "password").read_text().strip()


# ---------------------------------------------------------------------------------------
# 1. secrets never reach Redis, the logs or the database


def test_no_secret_reaches_redis_logs_or_database(stack, served, example, tmp_path):
    settings = stack.client_settings
    rows = example.x_test[:4]
    with RedisCapture(stack.broker_url) as capture:
        api_key = stack.create_account("scan")
        mc = ManagementClient(api_key, settings=settings)
        mc.deploy_model("scan", example.path)
        mc.activate_model("scan")
        worker = mc.start_worker("scan")
        token = mc.create_token("scan-user", model="scan")
        tid = token_id(mc, "scan-user")
        qc = QueryClient(token, settings=settings, key_dir=tmp_path / "scan-keys")
        qc.generate_keys()
        evaluation_key = qc.crypto.evaluation_key()
        qc.upload_evaluation_keys()
        outputs = [qc.predict(x) for x in rows[:3]]
        ciphertext = qc.encrypt(rows[3])
        outputs.append(qc.decrypt(qc.execute(ciphertext)))
        mc.revoke_token(tid)
        with pytest.raises(InvalidToken):
            qc.execute(qc.encrypt(rows[0]))
        mc.stop_worker(worker.id)
        capture.stop()
    qc.close()
    mc.close()
    clear = example.clear(rows)
    np.testing.assert_allclose(np.concatenate(outputs), clear, atol=0.05)  # the queries really ran

    time.sleep(1.5)  # appendfsync everysec
    aof = files_under(stack.data_dir / "redis" / "appendonlydir")
    logs = files_under(stack.data_dir / "logs")
    database = files_under(stack.data_dir, "cipherpool.db*")
    stored = redis_values(stack)
    corpus = expanded(capture.blobs() + stored + aof + logs + database)

    # The scan really looked: it saw the flow's traffic and finds what did travel.
    assert len(capture.commands) > 50, len(capture.commands)
    assert capture.messages, "no pub/sub message seen (results are published there)"
    assert aof and sum(len(b) for _, b in aof) > 10_000, [s for s, _ in aof]
    assert {Path(s).name for s, _ in logs} >= {"gateway.log", "control.log", "node1.log", "node2.log", "redis.log"}
    assert database and stored
    assert found_in(expanded(capture.blobs()), tid.encode()), "the token id never crossed Redis?"
    assert found_in(database, tid.encode()), "the token's row is not in the database files?"
    assert found_in(expanded(capture.blobs()), ciphertext[-256:]), "the ciphertext crossed Redis, the scan must find it"
    assert found_in(stored + aof, evaluation_key), "the evaluation key is stored in Redis, the scan must find it"

    needles = {
        "access token": token.encode(),
        "API key": api_key.encode(),
        "shared access token": served.token.encode(),
        "shared API key": served.api_key.encode(),
        **secret_key_needles(qc.key_dir),
    }
    for i, x in enumerate(rows):
        needles.update(plaintext_needles(f"input row {i}", x))
    for i, out in enumerate(outputs):
        needles.update(plaintext_needles(f"output {i}", out))
        needles[f"output {i} as returned"] = np.asarray(out).tobytes()
    assert not leaks(corpus, needles)

    password = redis_password(stack).encode()
    assert len(password) >= 32
    assert not leaks(logs + files_under(stack.data_dir, "stack.json"), {"Redis password": password})


# ---------------------------------------------------------------------------------------
# 2. the broker is private


def test_broker_refuses_anyone_without_its_password(stack, served, example):
    password = redis_password(stack)
    assert f":{password}@" in stack.broker_url
    for url in (without_password(stack.broker_url), without_password(stack.broker_url, "not-the-password")):
        assert password not in url
        r = redis.Redis.from_url(url, socket_timeout=10)
        try:
            for command in (("PING",), ("GET", "x"), ("KEYS", "*"), ("LPUSH", "cipherpool.pool", b"x")):
                with pytest.raises(redis.AuthenticationError):
                    r.execute_command(*command)
        finally:
            r.close()

    node = child(stack, served.node)
    pids = {c.name: c.pid for c in stack.supervisor.children}
    from cipherpool.config.celery import create_app

    app = create_app(stack.settings.model_copy(update={"broker_url": without_password(stack.broker_url)}), name="intruder")
    outcome: dict[str, object] = {}

    def shutdown_everything() -> None:
        try:
            outcome["reply"] = app.control.broadcast("shutdown", reply=False)
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    attempt = threading.Thread(target=shutdown_everything, daemon=True)
    attempt.start()
    attempt.join(120)
    app.close()
    assert not attempt.is_alive(), "the broadcast neither went out nor failed within 120 s"
    assert "error" in outcome, f"a shutdown broadcast without the password went out: {outcome}"
    assert "auth" in str(outcome["error"]).lower(), repr(outcome["error"])

    time.sleep(1.0)
    assert pid_alive(node.pid) and node.alive()
    assert {c.name: c.pid for c in stack.supervisor.children if c.alive()} == pids, "a platform process died"
    np.testing.assert_allclose(served.qc.predict(example.x_test[5]), example.clear(example.x_test[5:6]), atol=0.05)

    r = broker(stack)  # with the password: the ACL still refuses what reconfigures the server
    try:
        with pytest.raises(redis.ResponseError):
            r.config_get("*")
        with pytest.raises(redis.ResponseError):
            r.config_set("appendonly", "no")
        for command in (("ACL", "LIST"), ("MODULE", "LIST"), ("DEBUG", "SLEEP", "0"), ("REPLICAOF", "NO", "ONE")):
            with pytest.raises(redis.ResponseError):
                r.execute_command(*command)
        assert r.ping()
    finally:
        r.close()


# ---------------------------------------------------------------------------------------
# 3. zip bombs


def test_zip_bomb_with_a_wrong_key_costs_nothing(stack, served, zip_bomb):
    gateway = child(stack, "gateway")
    staged = ("cipherpool:upload:*", "cipherpool:staged:*")
    before = keys_like(stack, *staged)
    with http(stack) as client:
        assert_error(client.put("/v1/uploads", content=b"PK", headers=bearer("cpk_wrong")), 401, "invalid_api_key")  # warm-up
        memory = Memory(gateway.pid)
        with RedisCapture(stack.broker_url) as capture:
            response = client.put("/v1/uploads", content=zip_bomb, headers=bearer("cpk_wrong"))
            capture.stop()
        grown = memory.growth()
    assert_error(response, 401, "invalid_api_key")
    assert grown < 30 * MIB, f"the gateway grew by {grown / MIB:.1f} MiB for a body it should not read"
    assert keys_like(stack, *staged) == before
    assert not keys_like(stack, "cipherpool:upload:*")
    written = [c[:2] for c in capture.commands if c and c[0].upper() in (b"APPEND", b"SET", b"SETEX", b"RENAME")]
    assert not written, f"an unauthenticated body reached Redis: {written}"
    assert not any(zip_bomb[1000:1064] in a for c in capture.commands for a in c)


def test_zip_bomb_with_a_valid_key_is_refused_by_its_declared_size(stack, served, zip_bomb):
    gateway = child(stack, "gateway")
    with http(stack) as client:
        memory = Memory(gateway.pid)
        response = client.put("/v1/uploads", content=zip_bomb, headers=bearer(served.api_key))
        assert response.status_code == 201, response.text
        upload = response.json()["upload_id"]
        assert upload == hashlib.sha256(zip_bomb).hexdigest()
        deploy = {"name": "bomb", "client_upload": upload, "server_upload": upload}
        response = client.post("/v1/models", json=deploy, headers=bearer(served.api_key))
        grown = memory.growth()
        assert_error(response, 413, "payload_too_large")
        assert client.get("/v1/health").status_code == 200
    assert grown < 60 * MIB, f"the gateway grew by {grown / MIB:.1f} MiB checking a 1 GiB zip bomb"
    assert "bomb" not in {m.name for m in served.mc.list_models()}
    assert not keys_like(stack, "cipherpool:blob:server:" + upload, "cipherpool:blob:client:" + upload)


# ---------------------------------------------------------------------------------------
# 4. oversize bodies


def _chunks(total: int, first: bytes = b"", size: int = 16 * KIB):
    """A body of ``total`` bytes sent as a generator: httpx streams it chunked, without a
    Content-Length, so only counting the bytes as they come can stop it."""
    yield first
    sent = len(first)
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"\x5a" * n


class LogWatch:
    """What a log file gained since this watch began."""

    def __init__(self, path: Path):
        self.path, self.start = path, path.stat().st_size

    def new(self) -> str:
        return self.path.read_bytes()[self.start :].decode(errors="replace")

    def unhandled_errors(self) -> list[str]:
        """Unhandled exceptions the log reports: each one's header and its final line."""
        lines, found = self.new().splitlines(), []
        for i, line in enumerate(lines):
            if "Exception in ASGI application" in line:
                found.append(line.strip())
            elif line.startswith("Traceback"):
                ends = [x for x in lines[i + 1 :] if x and not x.startswith((" ", "Traceback"))]
                found.append(f"{line.strip()} ... {ends[0] if ends else '?'}")
        return found


def attempt(client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response | Exception:
    try:
        return client.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        return exc


def not_a_413(what: str, outcome: httpx.Response | Exception) -> str | None:
    """Why ``outcome`` is not a readable 413 payload_too_large, or None."""
    if isinstance(outcome, Exception):
        return f"{what}: no answer, {type(outcome).__name__}: {outcome}"
    if outcome.status_code != 413 or outcome.json().get("code") != "payload_too_large":
        return f"{what}: HTTP {outcome.status_code} {outcome.text[:200]}"
    return None


def body_writes(capture: RedisCapture, *prefixes: bytes) -> list[list[bytes]]:
    return [
        c[:2]
        for c in capture.commands
        if len(c) > 1 and c[0].upper() in (b"APPEND", b"SET", b"SETEX", b"SETRANGE") and c[1].startswith(prefixes)
    ]


def test_oversize_ciphertext_is_refused_before_it_is_stored(stack, served, example):
    ciphertext = served.qc.encrypt(example.x_test[0])
    assert len(ciphertext) < CIPHERTEXT_CAP
    oversize = ciphertext + bytes(CIPHERTEXT_CAP + 1 - len(ciphertext))
    token = bearer(served.token, **{"Content-Type": "application/octet-stream"})
    gateway_log = LogWatch(child(stack, "gateway").log_path)
    payloads_before = keys_like(stack, "cipherpool:payload:*")
    refused_before = node_stats(served.mc, served.model).queries_refused
    with http(stack) as client, RedisCapture(stack.broker_url) as capture:
        outcomes = {
            "POST /v1/queries, Content-Length cap+1": attempt(client, "POST", "/v1/queries", content=oversize, headers=token),
            "POST /v1/queries, chunked 4 x cap": attempt(
                client, "POST", "/v1/queries", headers=token, content=_chunks(4 * CIPHERTEXT_CAP, first=ciphertext)
            ),
        }
        time.sleep(0.5)
        capture.stop()
    # Nothing stored, nothing published, nothing reached the node.
    assert keys_like(stack, "cipherpool:payload:*") == payloads_before
    assert not body_writes(capture, b"cipherpool:payload:", b"cipherpool:upload:")
    assert not capture.published_tasks(QUERY_TASK)
    assert not any(b"\x5a" * 1024 in a for c in capture.commands for a in c)
    assert node_stats(served.mc, served.model).queries_refused == refused_before
    # Each refused with a 413 the client can read, and no unhandled error in the gateway.
    problems = [p for what, outcome in outcomes.items() if (p := not_a_413(what, outcome))]
    problems += [f"gateway log: {line}" for line in gateway_log.unhandled_errors()]
    assert not problems, "\n".join(problems)


def test_oversize_evaluation_key_is_refused_before_it_is_stored(stack, served):
    key_id = uuid.uuid4().hex
    token = bearer(served.token, **{"Content-Type": "application/octet-stream"})
    gateway_log = LogWatch(child(stack, "gateway").log_path)
    with http(stack) as client, RedisCapture(stack.broker_url) as capture:
        declared = attempt(client, "PUT", f"/v1/client/keys/{key_id}", content=bytes(KEY_CAP + 1), headers=token)
        # Streamed (chunked, no Content-Length), and longer than the 1 MiB the gateway
        # gathers before each append, so that an uncapped stream would have reached Redis.
        streamed = attempt(client, "PUT", f"/v1/client/keys/{key_id}", content=_chunks(3 * MIB), headers=token)
        time.sleep(0.5)
        capture.stop()
    if isinstance(streamed, httpx.Response):
        assert "content-length" not in streamed.request.headers
        assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert not keys_like(stack, "cipherpool:upload:*")
    assert not body_writes(capture, b"cipherpool:upload:", b"cipherpool:blob:")
    assert not any(b"\x5a" * 1024 in a for c in capture.commands for a in c)
    problems = [
        p
        for what, outcome in (("PUT key, Content-Length cap+1", declared), ("PUT key, chunked 3 MiB", streamed))
        if (p := not_a_413(what, outcome))
    ]
    problems += [f"gateway log: {line}" for line in gateway_log.unhandled_errors()]
    assert not problems, "\n".join(problems)
    # The key set was not registered: the real key still uploads under that id.
    response = httpx.put(
        f"{stack.gateway_url}/v1/client/keys/{key_id}", content=served.qc.crypto.evaluation_key(), headers=token, timeout=60
    )
    assert response.status_code == 201, response.text


# ---------------------------------------------------------------------------------------
# 5. rate limits


def test_token_rate_is_limited_and_the_client_waits_it_out(stack, served, example, tmp_path):
    token = served.mc.create_token("rate", model=served.model)
    qc = QueryClient(token, settings=stack.client_settings, key_dir=tmp_path / "rate-keys")
    qc.generate_keys()
    qc.upload_evaluation_keys()
    seen: list[int] = []
    qc._t._http.event_hooks["response"].append(lambda response: seen.append(response.status_code))

    with http(stack) as client, ThreadPoolExecutor(8) as pool:
        burst = range(3 * int(TOKEN_RATE_PER_S))
        responses = list(pool.map(lambda _: client.get("/v1/client/model", headers=bearer(token)), burst))
        statuses = [r.status_code for r in responses]
        limited = [r for r in responses if r.status_code == 429]
        assert limited and statuses.count(200) >= TOKEN_RATE_PER_S / 2, statuses
        assert set(statuses) == {200, 429}, statuses
        for r in limited:
            assert r.json()["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 2

        # The client, made to start inside a saturated window, retries after Retry-After.
        for _ in range(5):
            seen.clear()
            for _ in range(10 * int(TOKEN_RATE_PER_S)):
                if client.get("/v1/client/model", headers=bearer(token)).status_code == 429:
                    break
            else:
                raise AssertionError(f"{10 * int(TOKEN_RATE_PER_S)} requests in a row were never limited")
            result = qc.predict(example.x_test[2])
            np.testing.assert_allclose(result, example.clear(example.x_test[2:3]), atol=0.05)
            if 429 in seen:
                break
        assert 429 in seen and seen[-1] == 200, seen
    qc.close()


# ---------------------------------------------------------------------------------------
# 6. revocation


def _refused_within(qc: QueryClient, ciphertext: bytes, limit_s: float) -> float:
    """Seconds from now until a query with this client is refused as InvalidToken."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s + 5:
        try:
            qc.execute(ciphertext, timeout=30)
        except InvalidToken:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"the revoked token still worked {limit_s + 5:.0f} s after its revocation")


def test_a_revoked_token_stops_working_within_the_cache_ttl(stack, served, example, tmp_path):
    from cipherpool.db import session_scope
    from cipherpool.db.tables import AccessToken, Account
    from cipherpool.services.tokens import revoke_token

    limit = min(5.0, stack.settings.auth_cache_ttl_s + 1.0)
    for name, how in (("revoked-by-api", "gateway"), ("revoked-in-db", "database")):
        token = served.mc.create_token(name, model=served.model)
        tid = token_id(served.mc, name)
        qc = QueryClient(token, settings=stack.client_settings, key_dir=tmp_path / name)
        qc.generate_keys()
        qc.upload_evaluation_keys()
        x = example.x_test[7]
        ciphertext = qc.encrypt(x)
        np.testing.assert_allclose(qc.decrypt(qc.execute(ciphertext)), example.clear(x[None]), atol=0.05)  # works; cached
        if how == "gateway":
            served.mc.revoke_token(tid)
        else:  # as another gateway replica or an operator would: this gateway's cache still holds the grant
            with session_scope(stack.settings.effective_database_url()) as session:
                revoke_token(session, session.get(Account, session.get(AccessToken, tid).account_id), tid)
        elapsed = _refused_within(qc, ciphertext, limit)
        assert elapsed <= limit, f"{name}: still accepted {elapsed:.2f} s after revocation (limit {limit:g} s)"
        qc.close()


# ---------------------------------------------------------------------------------------
# 7. file modes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_platform_and_client_files_are_private(stack, served):
    data = stack.data_dir
    expected = {
        data: 0o700,
        data / "cipherpool.db": 0o600,
        data / "redis": 0o700,
        data / "redis" / "password": 0o600,
        data / "redis" / "redis.conf": 0o600,
        data / "stack.json": 0o600,
        data / "logs": 0o700,
    }
    aof_dir = data / "redis" / "appendonlydir"
    aof = [p for p in aof_dir.iterdir() if p.is_file()]
    assert aof, "no AOF files"
    expected.update({aof_dir: 0o700, **{p: 0o600 for p in aof}})
    logs = [p for p in (data / "logs").iterdir() if p.is_file()]
    assert {p.name for p in logs} >= {"gateway.log", "redis.log", "control.log"}
    expected.update({p: 0o600 for p in logs})
    expected.update({p: 0o600 for p in data.glob("cipherpool.db-*")})
    wrong = {str(p): f"{oct(_mode(p))}, expected {oct(mode)}" for p, mode in expected.items() if _mode(p) != mode}
    assert not wrong
    # Nothing the platform writes is open to group or others.
    open_to_others = {str(p): oct(_mode(p)) for p in [data, *data.rglob("*")] if _mode(p) & 0o077}
    assert not open_to_others

    keys = served.key_dir
    entries = [keys, *keys.rglob("*")]
    assert any(p.name.startswith("secretKey") for p in entries)
    wrong = {str(p): oct(_mode(p)) for p in entries if _mode(p) != (0o700 if p.is_dir() else 0o600)}
    assert not wrong, f"the client created these under key_dir={keys} (itself included) not 0700 (dirs) / 0600 (files): {wrong}"


# ---------------------------------------------------------------------------------------
# 8. unauthorised queries never reach a node


def test_unauthorised_queries_never_reach_a_node(stack, served, example, tmp_path):
    token = served.mc.create_token("soon-revoked", model=served.model)
    qc = QueryClient(token, settings=stack.client_settings, key_dir=tmp_path / "soon-revoked")
    qc.generate_keys()
    qc.upload_evaluation_keys()
    ciphertext = qc.encrypt(example.x_test[9])
    qc.decrypt(qc.execute(ciphertext))  # it worked once
    served.mc.revoke_token(token_id(served.mc, "soon-revoked"))
    forged = "cpt_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()

    log = child(stack, served.node).log_path
    log_start = log.stat().st_size
    stats_before = node_stats(served.mc, served.model)
    valid = served.qc.encrypt(example.x_test[9])
    octet = {"Content-Type": "application/octet-stream"}
    with http(stack) as client, RedisCapture(stack.broker_url) as capture:
        for credential, body in ((forged, ciphertext), (token, ciphertext), (forged, valid), (token, valid)):
            for wait in (0, 5):
                response = client.post("/v1/queries", params={"wait": wait}, content=body, headers=bearer(credential, **octet))
                assert_error(response, 401, "invalid_token" if credential == forged else "token_revoked")
        # A query that is authorised, in the same capture: the detection below does see one.
        response = client.post("/v1/queries", params={"wait": 30}, content=valid, headers=bearer(served.token, **octet))
        assert response.status_code == 200, response.text
        control_id = response.headers["x-cipherpool-query"]
        capture.stop()
    qc.close()

    published = capture.published_tasks(QUERY_TASK)
    assert len(published) == 1, f"{len(published)} query tasks published; only the authorised one should be"
    assert any(control_id.encode() in a for a in published[0])
    time.sleep(0.5)
    # Celery logs a query under its shadow name, cipherpool.query[<model>:<id8>] (the bare task
    # name only if a sender gave none): either way, every query the node received is found.
    received = re.findall(rb"cipherpool\.query(?:\.run|\[[^\]\s]*\])\[([0-9a-f-]{36})\] received", log.read_bytes()[log_start:])
    assert received == [control_id.encode()], received
    stats_after = node_stats(served.mc, served.model)
    assert stats_after.queries_refused == stats_before.queries_refused
    assert stats_after.queries_succeeded == stats_before.queries_succeeded + 1
