"""Property-based fuzzing: bad input gets a typed error, never a crash or an HTTP 500.

Decoders (ciphertext envelopes, query messages, deployment zips, Cap'n Proto framing) must
raise only their documented :class:`CipherpoolError`; a pool node must refuse any message with
a typed error and keep serving; every gateway endpoint must answer any method, path,
credential, header and body with a status below 500, and every 4xx with ``{"code", "message"}``.

The gateway runs in-process (``TestClient``) on its own Redis (a free loopback port, stopped
by its pid through the supervisor) and a SQLite database in a temporary directory.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import struct
import zipfile
from urllib.parse import quote

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cipherpool import errors
from cipherpool.errors import CipherpoolError, InvalidDeployment, InvalidInput, MalformedCiphertext, PayloadTooLarge
from cipherpool.fhe.deployment import CLIENT_ZIP, SERVER_ZIP, Versions, check_artifact, check_pair, read_versions
from cipherpool.fhe.evaluator import FakeEvaluator
from cipherpool.fhe.framing import MAX_SEGMENTS, capnp_message_length, header_bytes_needed, is_complete_message
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest, unwrap
from cipherpool.names import POOL_QUEUE, model_queue, query_routing_key
from cipherpool.store import BlobKind, sha256_hex
from cipherpool.workers.node import Binding, NodeRuntime
from cipherpool.workers.query import Delivery, handle
from tests.helpers import value_ciphertext, versions_json, zip_bytes
from tests.test_query_service import Ctx, MemoryStore, capnp

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GATEWAY = FAST  # each example is one in-process HTTP request or a few

# ---- strategies shared by the properties -------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
HEX = "0123456789abcdef"


def hex_string(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=n, max_size=n)


# What msgpack carries: the shapes a hand-made task message could have.
MSGPACKABLE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | TEXT
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT | st.binary(max_size=8), inner, max_size=5),
    max_leaves=20,
)
# What JSON carries (NaN and Infinity included: Python's json accepts them).
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=20,
)


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply flips, truncations, insertions, deletions and overwrites at positions modulo the length."""
    buf = bytearray(data)
    for op, pos, extra in ops:
        at = pos % (len(buf) + 1)
        if op == "flip" and buf:
            at = pos % len(buf)
            buf[at] ^= (extra[0] if extra else 0) or 0x01
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = extra
        elif op == "delete":
            del buf[at : at + max(1, len(extra))]
        elif op == "overwrite":
            buf[at : at + len(extra)] = extra
    return bytes(buf)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
        st.integers(0, 1 << 20),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=6,
)


# ---- ciphertext envelopes ----------------------------------------------------------------

ENVELOPE_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([EncryptedInput.FORMAT, EncryptedOutput.FORMAT, "cipherpool/other/1", ""]) | MSGPACKABLE,
        "model": TEXT | MSGPACKABLE,
        "key": TEXT | MSGPACKABLE,
        "data": st.binary(max_size=64) | MSGPACKABLE,
    },
)


def envelope_bytes() -> st.SearchStrategy[bytes]:
    """Raw bytes, msgpack of anything, near-valid envelope maps, and mutated valid envelopes."""
    valid = st.builds(lambda m, k, d: EncryptedInput(m, k, d).encode(), TEXT, TEXT, st.binary(max_size=64))
    return st.one_of(
        st.binary(max_size=256),
        MSGPACKABLE.map(lambda o: msgpack.packb(o, use_bin_type=True)),
        ENVELOPE_FIELDS.map(lambda o: msgpack.packb(o, use_bin_type=True)),
        st.tuples(valid, MUTATIONS).map(lambda t: mutate(*t)),
    )


@FAST
@given(raw=envelope_bytes() | st.builds(bytearray, st.binary(max_size=64)) | st.builds(memoryview, st.binary(max_size=64)))
def test_envelope_decoders_raise_only_malformed_ciphertext(raw):
    for cls in (EncryptedInput, EncryptedOutput):
        try:
            decoded = cls.decode(raw)
        except MalformedCiphertext:
            continue
        assert isinstance(decoded.model_id, str) and isinstance(decoded.key_id, str) and isinstance(decoded.data, bytes)
        assert cls.decode(decoded.encode()) == decoded  # whatever is accepted round-trips


@FAST
@given(obj=MSGPACKABLE)
def test_envelope_decoders_refuse_what_is_not_bytes(obj):
    assume(not isinstance(obj, bytes))
    for cls in (EncryptedInput, EncryptedOutput):
        with pytest.raises(MalformedCiphertext):
            cls.decode(obj)


def test_deeply_nested_envelope_is_malformed_not_a_stack_overflow():
    for raw in (b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 50_000 + b"\xc0"):
        with pytest.raises(MalformedCiphertext):
            EncryptedInput.decode(raw)


# ---- Cap'n Proto framing -----------------------------------------------------------------


def segment_table(sizes: list[int]) -> bytes:
    table = struct.pack("<I", len(sizes) - 1) + struct.pack(f"<{len(sizes)}I", *sizes)
    return table + b"\0" * ((-len(table)) % 8)


@MANY
@given(
    data=st.binary(max_size=2100)
    | st.builds(
        lambda sizes, tail: segment_table(sizes) + tail,
        st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=MAX_SEGMENTS + 40),
        st.binary(max_size=64),
    )
    | st.builds(lambda n, tail: struct.pack("<I", n) + tail, st.integers(0, 2**32 - 1), st.binary(max_size=64))
)
def test_capnp_framing_never_raises(data):
    length = capnp_message_length(data)
    assert length is None or (isinstance(length, int) and length >= 8)
    assert isinstance(is_complete_message(data), bool)
    need = header_bytes_needed(data[:8])
    assert isinstance(need, int) and 8 <= need <= 4 + 4 * (MAX_SEGMENTS + 1)
    if length is not None:  # the length depends on the segment table only
        assert capnp_message_length(data[:need] if len(data) >= need else data) == length
        assert capnp_message_length(data + b"\xff" * 16) == length


@FAST
@given(sizes=st.lists(st.integers(0, 2**20), min_size=1, max_size=MAX_SEGMENTS))
def test_capnp_framing_reads_a_valid_segment_table(sizes):
    head = segment_table(sizes)
    assert capnp_message_length(head) == len(head) + 8 * sum(sizes)
    assert header_bytes_needed(head[:8]) == 4 + 4 * len(sizes)


# ---- deployment zips ---------------------------------------------------------------------


def deflated_zip(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def member_data_span(data: bytes, member: str) -> tuple[int, int]:
    """Where a member's compressed bytes lie in the archive (after its local header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


CLIENT_FILES = {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()}
SERVER_FILES = {"versions.json": versions_json() + " " * 400}  # compressible: a real deflate stream
VALID_ZIPS = {
    (CLIENT_ZIP, "stored"): zip_bytes(CLIENT_FILES),
    (SERVER_ZIP, "stored"): zip_bytes(SERVER_FILES),
    (CLIENT_ZIP, "deflated"): deflated_zip(CLIENT_FILES),
    (SERVER_ZIP, "deflated"): deflated_zip(SERVER_FILES),
}
DEPLOYMENT_ERRORS = (InvalidDeployment, PayloadTooLarge)


def nested_json(depth: int, shape: str) -> str:
    if shape == "list":
        return "[" * depth + "]" * depth
    if shape == "dict":
        return '{"a":' * depth + "1" + "}" * depth
    inner = "[" * depth + "]" * depth  # valid at the top, deep inside a version field
    return '{"concrete-ml": ' + inner + ', "concrete-python": "1", "python": "3.11"}'


def check_both(data: bytes, name: str, cap: int | None) -> None:
    """read_versions and check_artifact: a Versions or a deployment error, nothing else."""
    for call in (lambda: read_versions(data, name), lambda: check_artifact(data, name, max_unzipped_bytes=cap)):
        try:
            assert isinstance(call(), Versions)
        except DEPLOYMENT_ERRORS:
            pass


@MANY
@given(which=st.sampled_from(sorted(VALID_ZIPS)), ops=MUTATIONS, cap=st.none() | st.integers(0, 10**6))
def test_mutated_deployment_zips_raise_only_deployment_errors(which, ops, cap):
    check_both(mutate(VALID_ZIPS[which], ops), which[0], cap)


@FAST
@given(
    which=st.sampled_from(sorted(VALID_ZIPS)),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_corrupt_deflate_streams_raise_only_deployment_errors(which, edits):
    """Bytes flipped inside versions.json's compressed data only: headers and sizes intact, so
    zlib itself meets the damage (zlib.error, a bad CRC) and must not escape."""
    data = bytearray(VALID_ZIPS[which])
    start, end = member_data_span(bytes(data), "versions.json")
    for pos, xor in edits:
        data[start + pos % (end - start)] ^= xor
    check_both(bytes(data), which[0], None)


@FAST
@given(raw=st.binary(max_size=512), name=st.sampled_from([CLIENT_ZIP, SERVER_ZIP, "other.zip"]))
def test_random_bytes_are_not_a_deployment(raw, name):
    check_both(raw, name, 10**6)


@FEW
@given(depth=st.integers(1_000, 30_000), shape=st.sampled_from(["list", "dict", "field"]), deflate=st.booleans())
def test_deeply_nested_versions_json_is_an_invalid_deployment(depth, shape, deflate):
    make = deflated_zip if deflate else zip_bytes
    data = make({**CLIENT_FILES, "versions.json": nested_json(depth, shape)})
    if shape == "field":  # well-formed at the top: below the recursion limit its str() is a version string
        check_both(data, CLIENT_ZIP, None)
        return
    for call in (lambda: read_versions(data, CLIENT_ZIP), lambda: check_artifact(data, CLIENT_ZIP)):
        with pytest.raises(InvalidDeployment):
            call()


@FAST
@given(versions=JSONISH | st.fixed_dictionaries({}, optional={k: JSONISH for k in ("concrete-ml", "concrete-python", "python")}))
def test_any_json_in_versions_json_reads_or_is_an_invalid_deployment(versions):
    data = zip_bytes({**CLIENT_FILES, "versions.json": json.dumps(versions)})
    check_both(data, CLIENT_ZIP, None)


def test_zip_bombs_are_refused_without_inflating():
    bomb = deflated_zip({**CLIENT_FILES, "versions.json": b"[" * (8 << 20)})  # 8 MiB declared, ~8 KiB stored
    assert len(bomb) < 64 * 1024
    with pytest.raises(InvalidDeployment):
        read_versions(bomb, CLIENT_ZIP)
    with pytest.raises(PayloadTooLarge):
        check_artifact(bomb, CLIENT_ZIP, max_unzipped_bytes=1 << 20)
    many = deflated_zip({**CLIENT_FILES, **{f"m{i}": b"" for i in range(1001)}})
    with pytest.raises(InvalidDeployment):
        check_artifact(many, CLIENT_ZIP)
    with pytest.raises(InvalidDeployment):
        check_pair(VALID_ZIPS[(CLIENT_ZIP, "stored")], bomb)


# ---- query messages on a pool node -------------------------------------------------------

NODE_MODEL, NODE_KEY = "m" * 16, "a" * 32


@pytest.fixture(scope="module")
def node_world(tmp_path_factory):
    from cipherpool.config.settings import Settings

    store = MemoryStore()
    blob_id = store.put(BlobKind.EVALUATION_KEY, capnp(4))
    ref = store.put_payload(EncryptedInput(NODE_MODEL, NODE_KEY, value_ciphertext()).encode(), 60)
    evaluator = FakeEvaluator()
    runtime = NodeRuntime(
        "n1",
        host_class="cpu",
        concurrency=1,
        threads=1,
        key_cache_bytes=10**6,
        key_memory_factor=1.0,
        evaluator_factory=lambda *_: evaluator,
    )
    runtime.set_binding(Binding("w1", NODE_MODEL, "m", model_queue("cpu", NODE_MODEL), evaluator, "n1"))
    ctx = Ctx(Settings(data_dir=tmp_path_factory.mktemp("node") / "data"), store)
    return ctx, runtime, blob_id, ref


OWN_QUEUE = Delivery(task_id="valid", routing_key=query_routing_key("cpu", NODE_MODEL), expires="2099-01-01T00:00:00")


def valid_node_request(blob_id: str) -> QueryRequest:
    body = EncryptedInput(NODE_MODEL, NODE_KEY, value_ciphertext()).encode()
    return QueryRequest(token_id="t1", model_id=NODE_MODEL, key_id=NODE_KEY, blob_id=blob_id, input=body)


def near_valid_requests(blob_id: str, ref: str) -> st.SearchStrategy[dict]:
    """Request maps with the real field names, each value right, wrong-typed or damaged."""
    envelope = st.builds(
        lambda m, k, d: EncryptedInput(m, k, d).encode(),
        st.just(NODE_MODEL) | TEXT,
        st.just(NODE_KEY) | TEXT,
        st.binary(max_size=64)
        | st.integers(0, 8).map(capnp)
        | st.integers(1, 8).map(lambda n: capnp(n)[:-3])
        | st.just(value_ciphertext()),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "token_id": TEXT | MSGPACKABLE,
            "model_id": st.just(NODE_MODEL) | TEXT | MSGPACKABLE,
            "key_id": st.just(NODE_KEY) | TEXT | MSGPACKABLE,
            "blob_id": st.just(blob_id) | hex_string(64) | TEXT | MSGPACKABLE,
            "input": st.none() | envelope | st.tuples(envelope, MUTATIONS).map(lambda t: mutate(*t)) | MSGPACKABLE,
            "input_ref": st.none() | st.just(ref) | TEXT | MSGPACKABLE,
            "submitted_at": st.integers(-(2**63), 2**64 - 1) | st.floats() | MSGPACKABLE,
            "unknown_field": MSGPACKABLE,
        },
    )


@FAST
@given(
    data=st.binary(max_size=512)
    | st.tuples(st.just(value_ciphertext(chunks=2)), MUTATIONS).map(lambda t: mutate(*t))
    | st.tuples(st.just(value_ciphertext()), st.integers(8, 200), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    )
)
def test_the_ciphertext_value_reader_answers_only_typed_refusals(data):
    """What the gateway and the node check before concrete: any bytes, a valid value mutated
    or with a few bytes overwritten (its pointers), is accepted or refused by type, at once."""
    from cipherpool.fhe.values import check_ciphertext

    try:
        check_ciphertext(data)
    except (MalformedCiphertext, errors.InvalidCiphertext):
        pass


@FAST
@given(data=st.data())
def test_any_query_message_gets_a_typed_refusal_and_the_node_keeps_serving(node_world, data):
    ctx, runtime, blob_id, ref = node_world
    obj = data.draw(MSGPACKABLE | near_valid_requests(blob_id, ref))
    wire = msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)  # as kombu hands it over
    before = runtime.stats.of_node().model_dump()
    # Through a queue that is not the model's own, so nothing may be requeued: every message
    # ends in exactly one envelope (a reply or a typed refusal), never an exception.
    envelope = handle(ctx, runtime, wire, Delivery(task_id="fuzz", routing_key=POOL_QUEUE))
    try:
        reply = QueryReply.decode(unwrap(envelope))
        assert reply.output is not None or reply.output_ref is not None
    except CipherpoolError:
        pass
    after = runtime.stats.of_node().model_dump()
    outcomes = ("queries_succeeded", "queries_refused", "queries_failed", "queries_requeued")
    assert [after[k] - before[k] for k in outcomes if after[k] != before[k]] == [1]  # one outcome, counted once
    assert after["queries_failed"] == 0
    served = QueryReply.decode(unwrap(handle(ctx, runtime, valid_node_request(blob_id).encode(), OWN_QUEUE)))
    assert served.output is not None and EncryptedOutput.decode(served.output).model_id == NODE_MODEL


# ---- the gateway -------------------------------------------------------------------------

MODEL_NAME = "fuzzmodel"
CLIENT_BYTES = VALID_ZIPS[(CLIENT_ZIP, "stored")]
SERVER_BYTES = VALID_ZIPS[(SERVER_ZIP, "stored")]
GW_KEY_ID = "b" * 32


class _Crashes(logging.Handler):
    """Collects the tracebacks the gateway logs for unexpected errors, for failure messages."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.db import init_db, session_scope
    from cipherpool.db.tables import ModelStatus
    from cipherpool.gateway.app import create_app
    from cipherpool.services import accounts, models, tokens
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.store import BlobStore

    tmp = tmp_path_factory.mktemp("gateway")
    supervisor = Supervisor(tmp / "logs")
    crashes = _Crashes()
    logger = logging.getLogger("cipherpool.gateway")
    logger.addHandler(crashes)
    try:
        _child, url = start_redis(supervisor, tmp / "redis")
        # No throttle on failed authentications: random credentials are refused here by the thousand.
        s = Settings(
            data_dir=tmp / "data",
            broker_url=url,
            token_rate_per_s=0,
            account_rate_per_s=0,
            metrics_token=METRICS_TOKEN,
            auth_failure_burst=0,
        )
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)
        client_blob, server_blob = store.put(BlobKind.CLIENT_ZIP, CLIENT_BYTES), store.put(BlobKind.SERVER_ZIP, SERVER_BYTES)
        store.redis.close()
        with session_scope(db) as session:
            account, api_key = accounts.create_account(session, "fuzz")
            _, other_key = accounts.create_account(session, "other")
            artifact = models.Artifact(client_blob, server_blob, len(CLIENT_BYTES), len(SERVER_BYTES), Versions("1", "1", "3.11"))
            model = models.deploy_model(session, account, MODEL_NAME, artifact)
            models.set_status(session, account, MODEL_NAME, ModelStatus.ACTIVE)
            _, token = tokens.create_token(session, account, "t", MODEL_NAME)
            revoked_row, revoked = tokens.create_token(session, account, "gone", MODEL_NAME)
            tokens.revoke_token(session, account, revoked_row.id)
            model_id = model.id
        app = create_app(s)
        with TestClient(app, raise_server_exceptions=False) as client:
            answer = client.put(f"/v1/client/keys/{GW_KEY_ID}", content=capnp(4), headers=bearer(token))
            assert answer.status_code == 201, answer.text
            yield GatewayWorld(client, app, url, api_key, other_key, token, revoked, model_id, crashes)
    finally:
        logger.removeHandler(crashes)
        supervisor.stop_all(grace_s=5)


class GatewayWorld:
    def __init__(self, client, app, url, api_key, other_key, token, revoked, model_id, crashes):
        self.client, self.app, self.url = client, app, url
        self.api_key, self.other_key, self.token, self.revoked = api_key, other_key, token, revoked
        self.model_id, self.crashes = model_id, crashes

    def on(self, client, app) -> GatewayWorld:
        """The same platform and credentials, through another gateway app."""
        other = copy.copy(self)
        other.client, other.app = client, app
        return other

    def request(self, method: str, path: str, **kwargs):
        self.crashes.records.clear()
        return self.client.request(method, path, **kwargs)

    def check_typed(self, response, method: str, what: str) -> dict | None:
        """Status below 500, nothing logged as unexpected, and a 4xx is {"code", "message"} with
        the status of the code's class."""
        crash = "\n".join(self.crashes.records)
        assert response.status_code < 500 and not crash, f"{what} -> {response.status_code} {response.text[:300]}\n{crash}"
        if response.status_code < 400 or method == "HEAD":
            return None
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"code", "message"}, f"{what} -> {response.text[:300]}"
        assert isinstance(body["code"], str) and body["code"] and isinstance(body["message"], str), what
        registered = errors._REGISTRY.get(body["code"])
        if registered is not None:
            assert registered.http_status == response.status_code, f"{what} -> {response.status_code} {body}"
        return body


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


ENDPOINTS = [
    ("PUT", "/v1/uploads", "bytes"),
    ("POST", "/v1/models", "json"),
    ("GET", "/v1/models", None),
    ("POST", "/v1/models/{name}/activate", None),
    ("POST", "/v1/models/{name}/deactivate", None),
    ("POST", "/v1/tokens", "json"),
    ("GET", "/v1/tokens", None),
    ("POST", "/v1/tokens/{id}/revoke", None),
    ("POST", "/v1/workers", "json"),
    ("GET", "/v1/workers", None),
    ("GET", "/v1/workers/stats", None),
    ("GET", "/v1/workers/{id}", None),
    ("POST", "/v1/workers/{id}/stop", None),
    ("GET", "/v1/client/model", None),
    ("GET", "/v1/client/model/client.zip", None),
    ("PUT", "/v1/client/keys/{key_id}", "bytes"),
    ("POST", "/v1/queries", "bytes"),
    ("GET", "/v1/queries/{query_id}", None),
    ("DELETE", "/v1/queries/{query_id}", None),
    ("GET", "/v1/health", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
METRICS_TOKEN = "fuzz-metrics-token"  # the operator's scraper credential (GET /metrics)
# A path segment: well-formed ids and names, traversal, encodings, unicode, very long.
SEGMENT = st.one_of(
    hex_string(16),
    hex_string(32),
    hex_string(64),
    st.uuids().map(str),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,70}\Z"),
    st.sampled_from(
        [
            "..",
            "../..",
            "../../etc/passwd",
            ".",
            "%2e%2e",
            "%2F",
            "%00",
            "%ff",
            "%",
            "%%",
            "a/b",
            "",
            "\u202e",
            "\U0001f600",
            "名前",
            "a" * 5000,
            "0" * 36,
            "-" * 36,
        ]
    ),
    st.text(max_size=80),
)
# Query strings: never a positive wait (that would long-poll).
WAIT = st.sampled_from(
    [
        "",
        "?wait=0",
        "?wait=-0",
        "?wait=-1",
        "?wait=nan",
        "?wait=inf",
        "?wait=-inf",
        "?wait=abc",
        "?wait=601",
        "?wait=1e309",
        "?wait=1e-400",
        "?wait=0&wait=0",
        "?model=x",
        "?model=%00",
        "?model=" + "a" * 300,
        "?&&==",
        "?wait",
    ]
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/octet-stream",
        "text/plain",
        "garbage",
        "application/json; charset=utf-16",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
        "application/vnd.x+json",
        ";;;",
        "application/",
    ]
)
ASCII = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


def credentials(world: GatewayWorld) -> st.SearchStrategy[dict[str, str]]:
    valid = st.sampled_from([world.api_key, world.other_key, world.token, world.revoked, METRICS_TOKEN])
    return st.one_of(
        st.just({}),
        ASCII.map(lambda v: {"Authorization": v}),
        st.sampled_from(["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer", "Bearer  ", "Token x"]).map(
            lambda v: {"Authorization": v}
        ),
        st.tuples(st.sampled_from(["cpk_", "cpt_", "cpx_", "", "CPK_"]), ASCII).map(lambda t: bearer(t[0] + t[1].strip() or "x")),
        st.just(bearer("cpk_" + "a" * 300)),
        valid.map(bearer),
        st.tuples(st.sampled_from(["bearer ", "BEARER ", "Bearer   "]), valid).map(
            lambda t: {"Authorization": t[0] + t[1] + "  "}
        ),
    )


def json_bodies(endpoint: str) -> st.SearchStrategy[object]:
    """Random JSON, or the endpoint's own fields with random or near-valid values."""
    name = st.just(MODEL_NAME) | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z") | TEXT | JSONISH
    sha = st.just(sha256_hex(CLIENT_BYTES)) | hex_string(64) | TEXT | JSONISH
    fields = {
        "/v1/models": {
            "name": name,
            "client_upload": sha,
            "server_upload": sha,
            "hardware": st.sampled_from(["cpu", "gpu", "tpu", "CPU", ""]) | JSONISH,
        },
        "/v1/tokens": {"name": name, "model": name, "ttl_s": st.none() | st.floats() | st.integers() | JSONISH},
        "/v1/workers": {"model": name},
    }[endpoint]
    extra = st.dictionaries(TEXT, JSONISH, max_size=2)
    shaped = st.tuples(st.fixed_dictionaries({}, optional=fields), extra).map(lambda t: {**t[1], **t[0]})
    return JSONISH | shaped


def starts_a_worker_for_the_model(method: str, path: str, body: object) -> bool:
    return method == "POST" and path.startswith("/v1/workers") and isinstance(body, dict) and body.get("model") == MODEL_NAME


@GATEWAY
@given(data=st.data())
def test_any_request_to_any_endpoint_gets_a_typed_answer(gateway, data):
    method = data.draw(st.sampled_from(METHODS) | st.sampled_from([m for m, _, _ in ENDPOINTS]), label="method")
    _, template, kind = data.draw(st.sampled_from(ENDPOINTS), label="endpoint")
    segment = data.draw(SEGMENT, label="segment")
    path = template
    for placeholder in ("{name}", "{id}", "{key_id}", "{query_id}"):
        path = path.replace(placeholder, quote(segment, safe="/.%"))
    path += data.draw(WAIT, label="query")
    headers = data.draw(credentials(gateway), label="auth")
    content_type = data.draw(CONTENT_TYPES, label="content-type")
    if content_type:
        headers = {**headers, "Content-Type": content_type}
    body_obj = None
    if kind == "json" and data.draw(st.booleans()):
        body_obj = data.draw(json_bodies(template), label="json")
        content = json.dumps(body_obj).encode()
    else:
        content = data.draw(st.none() | st.binary(max_size=512), label="bytes")
    assume(not starts_a_worker_for_the_model(method, path, body_obj))
    response = gateway.request(method, path, headers=headers, content=content)
    gateway.check_typed(response, method, f"{method} {path} {headers} {content!r:.200}")


JSON_ENDPOINTS = ["/v1/models", "/v1/tokens", "/v1/workers"]


@GATEWAY
@given(data=st.data())
def test_json_endpoints_answer_random_bodies_with_2xx_or_a_typed_4xx(gateway, data):
    endpoint = data.draw(st.sampled_from(JSON_ENDPOINTS), label="endpoint")
    body = data.draw(json_bodies(endpoint), label="body")
    assume(not starts_a_worker_for_the_model("POST", endpoint, body))
    headers = {**bearer(gateway.api_key), "Content-Type": data.draw(st.sampled_from(["application/json", "application/x+json"]))}
    response = gateway.request("POST", endpoint, headers=headers, content=json.dumps(body).encode())
    gateway.check_typed(response, "POST", f"POST {endpoint} {body!r:.300}")
    assert response.status_code < 300 or 400 <= response.status_code < 500, response.text


@GATEWAY
@given(data=st.data())
def test_random_headers_get_a_typed_answer(gateway, data):
    method, template, _ = data.draw(st.sampled_from([e for e in ENDPOINTS if "{" not in e[1]]), label="endpoint")
    end_user = template.startswith(("/v1/client", "/v1/queries"))
    headers = dict(bearer(gateway.token if end_user else gateway.api_key))
    declared = data.draw(
        st.one_of(
            st.none(),
            ASCII,
            st.integers(-(10**20), 10**30).map(str),
            st.sampled_from(["", " ", "1,1", "0x10", "1e3", "+5", "-0", " 5", "5 ", "٣", "99999999999999999999999999"]),
        ),
        label="content-length",
    )
    if declared is not None:
        try:
            declared.encode("ascii")
        except UnicodeEncodeError:
            declared = declared.encode("utf-8")
        headers["Content-Length"] = declared
    extra = data.draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "Content-Type",
                    "Transfer-Encoding",
                    "Content-Encoding",
                    "Expect",
                    "X-Forwarded-For",
                    "Accept",
                    "Host",
                    "Cookie",
                    "Range",
                ]
            ),
            ASCII,
            max_size=4,
        ),
        label="headers",
    )
    headers.update(extra)
    content = data.draw(st.binary(max_size=256), label="body")
    response = gateway.request(method, template + ("?wait=0" if "queries" in template else ""), headers=headers, content=content)
    gateway.check_typed(response, method, f"{method} {template} {headers} {content!r:.100}")


def asgi_call(
    gateway: GatewayWorld,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes] | None = None,
    read_body: bool = True,
) -> tuple[list[dict], BaseException | None]:
    """One request straight through the ASGI app (header bytes that no HTTP client sends, a body
    in as many pieces as given); returns the messages the app sent and the exception it let out."""
    sent: list[dict] = []
    pieces = list(chunks) if chunks else [b""]
    pending = [{"type": "http.request", "body": c, "more_body": i < len(pieces) - 1} for i, c in enumerate(pieces)][::-1]

    async def receive():
        if not read_body:
            raise AssertionError("the body was read")
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def call():
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1234),
            "headers": headers,
        }
        try:
            await gateway.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - what escapes is part of the verdict
            return exc
        return None

    return sent, gateway.client.portal.call(call)


def asgi_status(sent: list[dict]) -> tuple[int, dict | None]:
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, (json.loads(body) if status >= 400 else None)


OCTET_ENDPOINTS = [
    ("PUT", "/v1/uploads", "api_key"),
    ("PUT", f"/v1/client/keys/{GW_KEY_ID}", "token"),
    ("POST", "/v1/queries", "token"),
    ("POST", "/v1/tokens", "api_key"),
    ("GET", "/v1/models", "api_key"),
]


@FEW
@given(size=st.integers(2**29 + 1, 2**62), endpoint=st.sampled_from(OCTET_ENDPOINTS))
def test_a_huge_declared_length_is_refused_before_the_body_is_read(gateway, size, endpoint):
    """Above every cap (512 MiB is the largest): 413 from the guard, and the body is never asked for."""
    method, path, who = endpoint
    headers = [
        (b"authorization", f"Bearer {getattr(gateway, who)}".encode()),
        (b"content-length", str(size).encode()),
        (b"content-type", b"application/octet-stream"),
    ]
    sent, escaped = asgi_call(gateway, method, path, headers, read_body=False)
    assert escaped is None, repr(escaped)
    status, body = asgi_status(sent)
    assert status == 413 and body["code"] == "payload_too_large", body


LATIN1 = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@GATEWAY
@given(data=st.data())
def test_raw_header_bytes_get_a_typed_answer(gateway, data):
    """Header values as bytes (latin-1, as ASGI carries them): content-length, content-type and
    authorization from a valid credential's neighbourhood to noise."""
    method, path, who = data.draw(st.sampled_from(OCTET_ENDPOINTS), label="endpoint")
    credential = getattr(gateway, who).encode()
    auth = data.draw(
        st.one_of(
            st.just(b"Bearer " + credential),
            LATIN1.map(lambda b: b"Bearer " + b),
            st.tuples(st.sampled_from([b"cpk_", b"cpt_"]), LATIN1).map(lambda t: b"Bearer " + b"".join(t)),
            LATIN1,
        ),
        label="authorization",
    )
    declared = data.draw(st.none() | LATIN1 | st.sampled_from([b"00", b"\xa0", b"1 ", b"\xbd", b"\xbc1"]), label="content-length")
    headers = [(b"authorization", auth), (b"content-type", data.draw(LATIN1, label="content-type"))]
    if declared is not None:
        headers.append((b"content-length", declared))
    body = data.draw(st.binary(max_size=64), label="body")
    sent, escaped = asgi_call(gateway, method, path, headers, [body])
    status, answer = asgi_status(sent)
    assert escaped is None and status < 500, f"{method} {path} {headers} -> {status} {answer}: {escaped!r}"
    if answer is not None:
        assert isinstance(answer.get("code"), str) and isinstance(answer.get("message"), str), answer


@pytest.mark.parametrize("declared", [b"\xb2", b"1\xb9", b"\xb3\xb3"])
def test_a_content_length_of_superscript_digits_is_a_typed_refusal(gateway, declared):
    """Found by fuzzing: '²', '³' and '¹' (latin-1 B2, B3, B9) pass ``str.isdigit()`` but not
    ``int()``; the guard once answered 502. h11 refuses such a header before the app sees it,
    so over the wire it takes an ASGI server or proxy that passes it on."""
    headers = [(b"authorization", f"Bearer {gateway.api_key}".encode()), (b"content-length", declared)]
    sent, escaped = asgi_call(gateway, "GET", "/v1/models", headers)
    status, answer = asgi_status(sent)
    assert escaped is None and status == 413 and answer["code"] == "payload_too_large", (status, answer, escaped)


SMALL_CAPS = {
    "max_json_bytes": 256,
    "max_ciphertext_bytes": 512,
    "max_evaluation_key_bytes": 512,
    "max_deployment_zip_bytes": 512,
}


@pytest.fixture(scope="module")
def small_gateway(gateway):
    """A second gateway on the same Redis and database, with caps small enough to cross cheaply."""
    from fastapi.testclient import TestClient

    from cipherpool.gateway.app import create_app

    app = create_app(gateway.app.state.gw.settings.model_copy(update=SMALL_CAPS))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield gateway.on(client, app)


CAPPED_ENDPOINTS = [
    ("PUT", "/v1/uploads", "api_key", "max_deployment_zip_bytes"),
    ("PUT", f"/v1/client/keys/{'d' * 32}", "token", "max_evaluation_key_bytes"),
    ("POST", "/v1/queries", "token", "max_ciphertext_bytes"),
    ("POST", f"/v1/client/keys/{'d' * 32}/warmup", "token", "max_ciphertext_bytes"),
    ("POST", "/v1/tokens", "api_key", "max_json_bytes"),
]


@GATEWAY
@given(data=st.data())
def test_bodies_over_the_cap_are_cut_off_with_413_and_leave_nothing_stored(small_gateway, data):
    """Declared or streamed in pieces (no Content-Length), a body past its endpoint's cap is a
    413 payload_too_large, and no half-streamed upload stays in Redis; under the cap, a typed answer."""
    method, path, who, cap_name = data.draw(st.sampled_from(CAPPED_ENDPOINTS), label="endpoint")
    cap = SMALL_CAPS[cap_name]
    size = data.draw(st.integers(0, 3 * cap) | st.sampled_from([cap, cap + 1]), label="size")
    body = (data.draw(st.sampled_from([b"\x07", b"\x00", b"{", b"PK\x03\x04"]), label="filler") * size)[:size]
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=6), label="cuts"))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
    headers = [
        (b"authorization", f"Bearer {getattr(small_gateway, who)}".encode()),
        (b"content-type", b"application/json" if cap_name == "max_json_bytes" else b"application/octet-stream"),
    ]
    declared = data.draw(st.booleans(), label="declared")
    if declared:
        headers.append((b"content-length", str(size).encode()))
    sent, escaped = asgi_call(small_gateway, method, path, headers, chunks)
    status, answer = asgi_status(sent)
    what = f"{method} {path} {size} bytes in {len(chunks)} pieces, declared={declared}"
    assert escaped is None and status < 500, f"{what} -> {status} {answer}: {escaped!r}"
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1, f"{what}: {sent}"
    if size > cap:
        assert status == 413 and answer["code"] == "payload_too_large", f"{what} -> {status} {answer}"
    elif answer is not None:
        assert isinstance(answer.get("code"), str) and isinstance(answer.get("message"), str), answer
    assert _upload_keys(small_gateway.url)[0] == 0, what


@pytest.mark.parametrize("pieces", [1, 4])
def test_an_oversize_query_without_a_declared_length_is_refused_without_an_escaping_error(small_gateway, pieces):
    """Found by fuzzing: ``POST /v1/queries`` sent without Content-Length (chunked) and past
    ``max_ciphertext_bytes``: the guard answers 413 and reports a disconnect; the route's
    ``request.body()`` then raised ClientDisconnect, which escaped the app and logged a
    traceback per request (an error log any token holder could flood)."""
    cap = SMALL_CAPS["max_ciphertext_bytes"]
    chunks = [b"\x07" * (cap // pieces + 1)] * pieces
    headers = [
        (b"authorization", f"Bearer {small_gateway.token}".encode()),
        (b"content-type", b"application/octet-stream"),
        (b"transfer-encoding", b"chunked"),
    ]
    sent, escaped = asgi_call(small_gateway, "POST", "/v1/queries", headers, chunks)
    status, answer = asgi_status(sent)
    assert status == 413 and answer["code"] == "payload_too_large", (status, answer)
    assert escaped is None, f"{escaped!r} escaped the gateway"


def _ciphertext_refusal(data: bytes) -> str | None:
    from cipherpool.fhe.values import check_ciphertext

    try:
        check_ciphertext(data)
    except InvalidInput as exc:
        return exc.code
    return None


def envelopes_for_gateway(model_id: str) -> st.SearchStrategy[bytes]:
    near = st.builds(
        lambda m, k, d: EncryptedInput(m, k, d).encode(),
        st.just(model_id) | TEXT,
        st.just(GW_KEY_ID) | hex_string(32) | TEXT,
        st.binary(max_size=64)
        | st.integers(0, 4).map(capnp)
        | st.just(value_ciphertext())
        | st.binary(min_size=96, max_size=96).map(lambda payload: value_ciphertext(payload=payload)),
    )
    return st.one_of(
        envelope_bytes(),
        near,
        st.tuples(near, MUTATIONS).map(lambda t: mutate(*t)),
        st.builds(lambda m: EncryptedOutput(m, GW_KEY_ID, capnp(1)).encode(), st.just(model_id)),
    )


@pytest.fixture(scope="module")
def active_model(gateway):
    """The fuzzed provider endpoints may have deactivated the model; the query oracle needs it active."""
    answer = gateway.request("POST", f"/v1/models/{MODEL_NAME}/activate", headers=bearer(gateway.api_key))
    assert answer.status_code == 200, answer.text
    return gateway.model_id


@GATEWAY
@given(data=st.data())
def test_random_ciphertexts_get_a_typed_refusal(gateway, active_model, data):
    body = data.draw(envelopes_for_gateway(active_model), label="ciphertext")
    content_type = data.draw(CONTENT_TYPES.filter(bool) | st.just("application/octet-stream"), label="content-type")
    headers = {**bearer(gateway.token), "Content-Type": content_type}
    # No node runs here: the query is queued for a worker to come (else no_worker_up, 503).
    response = gateway.request("POST", "/v1/queries?wait=0&wait_for_worker=true", headers=headers, content=body)
    answer = gateway.check_typed(response, "POST", f"POST /v1/queries {body!r:.300}")
    try:
        envelope = EncryptedInput.decode(body)
    except MalformedCiphertext:
        assert response.status_code == 422 and answer["code"] == "malformed_ciphertext", response.text
        return
    if envelope.model_id != active_model:
        assert answer and answer["code"] == "token_not_for_model", response.text
    elif envelope.key_id != GW_KEY_ID:
        assert answer and answer["code"] == "evaluation_key_not_found", response.text
    elif (refusal := _ciphertext_refusal(envelope.data)) is not None:  # refused before it is counted or queued
        assert response.status_code == 422 and answer["code"] == refusal, response.text
    else:  # a well-formed query (its values may still be garbage: concrete computes on them) is queued
        assert response.status_code == 202, response.text
        query_id = response.json()["id"]
        polled = gateway.request("GET", f"/v1/queries/{query_id}?wait=0", headers=bearer(gateway.token))
        assert polled.status_code == 202 and polled.json()["status"] == "queued", polled.text
        foreign = gateway.request("GET", f"/v1/queries/{query_id}", headers=bearer(gateway.revoked))
        assert foreign.status_code == 401, foreign.text


@FEW
@given(which=st.sampled_from(sorted(VALID_ZIPS)), ops=st.none() | MUTATIONS, name=st.from_regex(r"\A[a-z][a-z0-9]{0,20}\Z"))
def test_deploying_mutated_artifacts_answers_typed_errors(gateway, which, ops, name):
    """Upload a (possibly damaged) artifact and deploy it: 201 for a usable pair, else a typed 4xx."""
    artifact = VALID_ZIPS[which] if ops is None else mutate(VALID_ZIPS[which], ops)
    assume(artifact)
    headers = {**bearer(gateway.api_key), "Content-Type": "application/octet-stream"}
    name_of_other = CLIENT_ZIP if which[0] == SERVER_ZIP else SERVER_ZIP
    shas = {}
    for kind, data in ((which[0], artifact), (name_of_other, VALID_ZIPS[(name_of_other, which[1])])):
        upload = gateway.request("PUT", "/v1/uploads", headers=headers, content=data)
        assert upload.status_code == 201, upload.text
        shas[kind] = upload.json()["upload_id"]
    body = {"name": f"dep-{name}", "client_upload": shas[CLIENT_ZIP], "server_upload": shas[SERVER_ZIP]}
    response = gateway.request("POST", "/v1/models", headers=bearer(gateway.api_key), json=body)
    answer = gateway.check_typed(response, "POST", f"deploy {which} {artifact!r:.300}")
    if answer is None:
        assert response.status_code == 201
    else:
        assert answer["code"] in {"invalid_deployment", "payload_too_large", "model_exists", "upload_not_found"}, answer


def _upload_keys(url: str) -> tuple[int, int]:
    client = redis.Redis.from_url(url)
    try:
        return len(client.keys("cipherpool:upload:*")), len(client.keys("cipherpool:staged:*"))
    finally:
        client.close()


@pytest.mark.parametrize(
    "path, credential",
    [
        ("/v1/uploads", "cpk_wrong"),
        ("/v1/uploads", None),
        ("/v1/uploads", "token"),
        (f"/v1/client/keys/{'c' * 32}", "cpt_wrong"),
        (f"/v1/client/keys/{'c' * 32}", "api_key"),
    ],
)
def test_a_big_body_with_a_wrong_credential_is_refused_and_nothing_is_stored(gateway, path, credential):
    before = _upload_keys(gateway.url)
    headers = {"Content-Type": "application/octet-stream"}
    if credential is not None:
        headers.update(bearer(getattr(gateway, credential, credential)))
    body = b"PK\x03\x04" + b"\x00" * (8 << 20)
    response = gateway.request("PUT", path, headers=headers, content=body)
    answer = gateway.check_typed(response, "PUT", f"PUT {path} with {credential}")
    expected = 403 if credential in ("token", "api_key") else 401
    assert response.status_code == expected and answer["code"] in {"invalid_api_key", "invalid_token", "wrong_credential"}
    assert _upload_keys(gateway.url) == before
    assert _upload_keys(gateway.url)[0] == 0  # no body half-streamed into the store
