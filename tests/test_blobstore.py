"""The blob store on each of its backends, each against a real server or directory: files in a
temporary directory (fs), moto's S3 server (s3) and a redis-server (redis), both started here
on free loopback ports and stopped by their pids. Then a full store on each: Redis with a tiny
maxmemory, a tiny tmpfs (where this process may mount one) and the size cap."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid

import pytest

from cipherpool.blobs.filesystem import FsBackend
from cipherpool.blobs.redis_backend import RedisBackend
from cipherpool.blobs.s3 import S3Backend
from cipherpool.config.settings import Settings
from cipherpool.errors import BrokerUnavailable, NotFound, StoreFull, UploadNotFound
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import Supervisor, free_port
from cipherpool.store import BlobKind, BlobStore, redis_client, sha256_hex
from tests.s3server import ACCESS_KEY, SECRET_KEY, start_moto

KINDS = ["fs", "s3", "redis"]
MIB = 1024**2


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One redis-server and one moto server for the module."""
    tmp = tmp_path_factory.mktemp("servers")
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, redis_url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=256 * MIB)
        moto = start_moto(supervisor, tmp / "logs")
        yield redis_url, moto
    finally:
        supervisor.stop_all(grace_s=5)


def make_store(kind: str, servers, tmp_path, **settings_fields) -> BlobStore:
    redis_url, moto = servers
    client = redis_client(redis_url)
    if kind == "redis":  # a clean Redis for each test (the ACL refuses FLUSHDB)
        for key in client.scan_iter(match="cipherpool:*"):
            client.delete(key)
    fields = {"data_dir": tmp_path / "data", "store_url": redis_url, "blob_store": kind, **settings_fields}
    if kind == "s3":
        fields.update(moto.make_bucket(f"b-{uuid.uuid4().hex[:12]}").settings(**settings_fields))
    return BlobStore.from_settings(Settings(**fields))


@pytest.fixture(params=KINDS)
def store(request, servers, tmp_path) -> BlobStore:
    made = make_store(request.param, servers, tmp_path)
    yield made
    made.redis.close()


def let_expire(store: BlobStore, ttl_s: int = 1) -> None:
    """Time past a temporary's deadline of ``ttl_s``. Redis expires its keys itself, to the
    millisecond: waited for. The filesystem and S3 backends compare a deadline with their own
    clock (S3's spool too): moved forward instead, so these tests do not sleep 2 s apiece."""
    if isinstance(store.backend, RedisBackend):
        time.sleep(ttl_s + 0.1)
        return
    for backend in (store.backend, getattr(store.backend, "spool", None)):
        if backend is not None:
            clock = backend._clock
            backend._clock = lambda clock=clock: clock() + ttl_s + 1.1


def upload(store: BlobStore, data: bytes, ttl_s: int = 60, chunk: int = 1000) -> str:
    name = store.new_upload()
    for i in range(0, len(data), chunk):
        store.append_upload(name, data[i : i + chunk], ttl_s)
    return name


# -- every backend ---------------------------------------------------------------------------


def test_content_addressed_blobs_round_trip(store):
    data = os.urandom(5000)
    blob_id = store.put(BlobKind.EVALUATION_KEY, data)
    assert blob_id == sha256_hex(data)
    assert store.put(BlobKind.EVALUATION_KEY, data) == blob_id  # idempotent
    assert store.exists(BlobKind.EVALUATION_KEY, blob_id) and not store.exists(BlobKind.CLIENT_ZIP, blob_id)
    assert store.get(BlobKind.EVALUATION_KEY, blob_id) == data
    assert store.size(BlobKind.EVALUATION_KEY, blob_id) == 5000
    assert store.head(BlobKind.EVALUATION_KEY, blob_id, 8) == data[:8]
    assert store.blobs() == {(BlobKind.EVALUATION_KEY, blob_id): 5000}
    store.delete(BlobKind.EVALUATION_KEY, blob_id)
    assert not store.exists(BlobKind.EVALUATION_KEY, blob_id) and store.size(BlobKind.EVALUATION_KEY, blob_id) == 0
    with pytest.raises(NotFound):
        store.get(BlobKind.EVALUATION_KEY, blob_id)
    store.delete(BlobKind.EVALUATION_KEY, blob_id)  # nothing to delete: no error


def test_a_corrupt_blob_is_refused(store):
    blob_id = sha256_hex(b"the real bytes")
    store.backend.put(f"cipherpool:blob:evk:{blob_id}", b"other bytes")
    with pytest.raises(NotFound, match="corrupt"):
        store.get(BlobKind.EVALUATION_KEY, blob_id)


def test_an_upload_is_adopted_under_its_content_address_and_leaves_nothing(store):
    data = os.urandom(4500)
    name = upload(store, data)
    assert store.upload_head(name, 10) == data[:10]
    store.adopt(name, BlobKind.EVALUATION_KEY, sha256_hex(data))
    assert store.get(BlobKind.EVALUATION_KEY, sha256_hex(data)) == data
    assert store.upload_head(name, 10) == b""
    with pytest.raises(UploadNotFound):
        store.adopt(name, BlobKind.EVALUATION_KEY, sha256_hex(data))  # used once


def test_a_discarded_or_expired_upload_cannot_be_adopted(store):
    gone = upload(store, b"x" * 100)
    store.discard_upload(gone)
    with pytest.raises(UploadNotFound):
        store.adopt(gone, BlobKind.EVALUATION_KEY, sha256_hex(b"x" * 100))
    late = upload(store, b"y" * 100, ttl_s=1)
    let_expire(store)
    with pytest.raises(UploadNotFound):
        store.adopt(late, BlobKind.EVALUATION_KEY, sha256_hex(b"y" * 100))
    store.sweep()
    assert not store.blobs()


def test_staged_artifacts_wait_for_a_deploy_then_expire(store):
    data = os.urandom(3000)
    blob_id = sha256_hex(data)
    store.stage(upload(store, data), "acct1", blob_id, 60)
    assert store.get_staged("acct1", blob_id) == data
    with pytest.raises(UploadNotFound):
        store.get_staged("acct2", blob_id)  # another account's
    store.adopt(store.staged_key("acct1", blob_id), BlobKind.SERVER_ZIP, blob_id)
    assert store.get(BlobKind.SERVER_ZIP, blob_id) == data
    with pytest.raises(UploadNotFound):
        store.get_staged("acct1", blob_id)  # adopted: no longer staged
    other = os.urandom(3000)
    store.stage(upload(store, other), "acct1", sha256_hex(other), 1)
    let_expire(store)
    with pytest.raises(UploadNotFound):
        store.get_staged("acct1", sha256_hex(other))
    with pytest.raises(UploadNotFound):
        store.adopt(store.staged_key("acct1", sha256_hex(other)), BlobKind.SERVER_ZIP, sha256_hex(other))


def test_payloads_expire_and_can_be_kept_longer_or_deleted(store):
    ref = store.put_payload(b"ciphertext" * 100, 1)
    assert store.get_payload(ref) == b"ciphertext" * 100
    store.expire_payload(ref, 60)
    let_expire(store)
    assert store.get_payload(ref) == b"ciphertext" * 100  # kept longer
    store.delete_payload(ref)
    with pytest.raises(NotFound):
        store.get_payload(ref)
    short = store.put_payload(b"z", 1)
    let_expire(store)
    with pytest.raises(NotFound):
        store.get_payload(short)
    with pytest.raises(NotFound):
        store.get_payload("../../etc/passwd")


def test_the_store_answers_a_ping(store):
    store.ping()


# -- the filesystem's files --------------------------------------------------------------------


def test_fs_files_are_private_and_writes_whole(servers, tmp_path):
    store = make_store("fs", servers, tmp_path)
    blob_id = store.put(BlobKind.CLIENT_ZIP, b"zip" * 100)
    path = store.backend.path(f"cipherpool:blob:client:{blob_id}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in [path.parent, *path.parents]:
        if folder == tmp_path:
            break
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert not list((tmp_path / "data" / "blobs" / ".tmp").iterdir())  # renamed into place
    name = upload(store, b"abc")
    assert stat.S_IMODE(store.backend.path(name).stat().st_mode) == 0o600


def test_fs_sweep_removes_only_what_is_past_its_deadline(servers, tmp_path):
    store = make_store("fs", servers, tmp_path)
    old, live = upload(store, b"a", ttl_s=1), upload(store, b"b", ttl_s=60)
    ref = store.put_payload(b"p", 1)
    blob_id = store.put(BlobKind.EVALUATION_KEY, b"kept")
    let_expire(store)
    assert store.sweep() == 2
    assert not store.backend.path(old).exists() and store.backend.path(live).exists()
    assert not store.backend.path("cipherpool:payload:" + ref).exists()
    assert store.exists(BlobKind.EVALUATION_KEY, blob_id)


def test_a_sweep_between_an_appends_write_and_its_deadline_leaves_the_upload(servers, tmp_path):
    """An append writes its chunk, then sets the file's deadline (its mtime): a sweep from
    another thread in between saw an mtime just past and deleted the upload."""
    store = make_store("fs", servers, tmp_path)
    name = upload(store, b"first chunk")
    path = store.backend.path(name)
    with open(path, "ab") as f:  # a chunk written, its deadline not set yet: the mtime is now
        f.write(b" second")
    assert store.sweep() == 0 and path.read_bytes() == b"first chunk second"


def test_names_outside_the_store_are_not_found(servers, tmp_path):
    store = make_store("fs", servers, tmp_path)
    for name in ("cipherpool:upload:../x", "cipherpool:payload:a/b", "other:thing", "cipherpool:blob:evk:..."):
        with pytest.raises(NotFound):
            store.backend.path(name)


# -- a full store refuses with StoreFull -------------------------------------------------------


def test_a_full_redis_raises_store_full(tmp_path):
    """redis-py raises OutOfMemoryError ("command not allowed when used memory > 'maxmemory'"),
    which the old ``str(exc).startswith("OOM")`` test never matched."""
    supervisor = Supervisor(tmp_path / "logs")
    try:
        _child, url = start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=4 * MIB)
        store = BlobStore.from_url(url)
        name = store.new_upload()
        with pytest.raises(StoreFull) as raised:
            for _ in range(16):
                store.append_upload(name, os.urandom(MIB), 60)
        assert raised.value.code == "store_full" and raised.value.http_status == 507
        store.discard_upload(name)  # a delete is allowed when full, and makes room
        assert store.get_payload(store.put_payload(b"small", 60)) == b"small"
        store.redis.close()
    finally:
        supervisor.stop_all(grace_s=5)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MiB tmpfs, where this process may mount one (root); else the test is skipped."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_filesystem_raises_store_full(servers, tiny_tmpfs, tmp_path):
    store = make_store("fs", servers, tmp_path, blob_dir=tiny_tmpfs)
    name = store.new_upload()
    with pytest.raises(StoreFull, match="No space left"):
        for _ in range(4):
            store.append_upload(name, os.urandom(MIB), 60)
    store.discard_upload(name)
    with pytest.raises(StoreFull):
        store.put(BlobKind.EVALUATION_KEY, os.urandom(3 * MIB))
    assert not list((tiny_tmpfs / ".tmp").iterdir())  # the refused write left nothing
    assert store.get(BlobKind.EVALUATION_KEY, store.put(BlobKind.EVALUATION_KEY, b"fits")) == b"fits"


@pytest.mark.parametrize("kind", ["fs", "s3"])
def test_the_size_cap_refuses_writes_past_it(kind, servers, tmp_path):
    """moto has no bucket quota, so the cap (CIPHERPOOL_BLOB_STORE_MAX_BYTES) stands in for one."""
    store = make_store(kind, servers, tmp_path, blob_store_max_bytes=3 * MIB)
    kept = store.put(BlobKind.EVALUATION_KEY, os.urandom(2 * MIB))
    name = store.new_upload()
    store.append_upload(name, os.urandom(MIB // 2), 60)
    with pytest.raises(StoreFull, match="BLOB_STORE_MAX_BYTES"):
        store.append_upload(name, os.urandom(MIB), 60)
    store.discard_upload(name)
    with pytest.raises(StoreFull):
        store.put_payload(os.urandom(2 * MIB), 60)
    store.delete(BlobKind.EVALUATION_KEY, kept)  # room again, measured at the next write
    store.put_payload(os.urandom(2 * MIB), 60)


@pytest.mark.parametrize(
    "code, status",
    [("QuotaExceeded", 403), ("XMinioAdminBucketQuotaExceeded", 400), ("XMinioStorageFull", 507), ("InsufficientStorage", 507)],
)
def test_s3_quota_and_full_storage_errors_are_store_full(code, status, tmp_path):
    from botocore.exceptions import ClientError

    backend = S3Backend("b", spool=tmp_path / "spool", endpoint_url="http://127.0.0.1:9")

    def refuse() -> None:
        raise ClientError(
            {"Error": {"Code": code, "Message": "no room"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    with pytest.raises(StoreFull):
        backend._guard(refuse)


def test_an_unreachable_s3_endpoint_is_broker_unavailable(tmp_path):
    backend = S3Backend(
        "b",
        spool=tmp_path / "spool",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
    )
    with pytest.raises(BrokerUnavailable):
        backend.ping()
    with pytest.raises(BrokerUnavailable):
        backend.get("cipherpool:blob:evk:" + "a" * 64)


def test_an_fs_store_on_a_missing_directory_is_not_ready(tmp_path):
    backend = FsBackend(tmp_path / "blobs")
    backend.ping()
    (tmp_path / "blobs").chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        with pytest.raises(BrokerUnavailable):
            backend.ping()
    finally:
        (tmp_path / "blobs").chmod(0o700)


# -- which backend the settings pick -----------------------------------------------------------


def test_the_default_backend_is_fs_without_a_broker_url_and_redis_with_one(tmp_path):
    assert Settings(data_dir=tmp_path).effective_blob_store() == "fs"
    assert Settings(data_dir=tmp_path).effective_blob_dir() == tmp_path / "blobs"
    assert Settings(data_dir=tmp_path, broker_url="redis://x").effective_blob_store() == "redis"
    assert Settings(data_dir=tmp_path, broker_url="redis://x", blob_store="s3").effective_blob_store() == "s3"
    assert Settings(data_dir=tmp_path).effective_node_blob_cache_bytes() == 0  # fs is a disk already
    assert Settings(data_dir=tmp_path, blob_store="s3").effective_node_blob_cache_bytes() == 8 * 1024**3
