"""`cipherpool store check` and `cipherpool store migrate`, and a pool node's disk cache, against
a real redis-server (started here, stopped by its pid), a migrated SQLite database and files."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from cipherpool.blobs import DiskCache, read_figures
from cipherpool.cli import cli
from cipherpool.config.settings import Settings, reset_settings
from cipherpool.db import session_scope
from cipherpool.db.tables import EvaluationKey
from cipherpool.errors import NotFound
from cipherpool.fhe.deployment import Versions
from cipherpool.services import accounts, models, tokens
from cipherpool.stack.redis_server import start_redis
from cipherpool.stack.supervisor import Supervisor
from cipherpool.store import BlobKind, BlobStore, sha256_hex

CLIENT, SERVER, KEY, ORPHAN = b"client.zip" * 50, b"server.zip" * 50, b"evaluation key" * 500, b"nobody's" * 10


@pytest.fixture
def legacy(tmp_path, migrated_sqlite, monkeypatch):
    """A platform of an older release: blobs in Redis, the rows that reference them, and one
    blob that nothing references."""
    supervisor = Supervisor(tmp_path / "logs")
    try:
        _child, url = start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=64 * 1024**2)
        settings = Settings(data_dir=tmp_path / "data", broker_url=url, blob_store="fs")
        db = migrated_sqlite(settings.effective_database_url())
        redis_store = BlobStore.from_url(url)
        blobs = [
            redis_store.put(kind, data)
            for kind, data in (
                (BlobKind.CLIENT_ZIP, CLIENT),
                (BlobKind.SERVER_ZIP, SERVER),
                (BlobKind.EVALUATION_KEY, KEY),
                (BlobKind.EVALUATION_KEY, ORPHAN),
            )
        ]
        with session_scope(db) as session:
            account, _ = accounts.create_account(session, "p")
            model = models.deploy_model(
                session, account, "m", models.Artifact(blobs[0], blobs[1], len(CLIENT), len(SERVER), Versions("1", "1", "3.11"))
            )
            token, _ = tokens.create_token(session, account, "t", "m")
            session.add(
                EvaluationKey(key_id="k" * 32, blob_id=blobs[2], token_id=token.id, model_id=model.id, size_bytes=len(KEY))
            )
        for name, value in (("DATA_DIR", settings.data_dir), ("BROKER_URL", url), ("BLOB_STORE", "fs")):
            monkeypatch.setenv(f"CIPHERPOOL_{name}", str(value))
        reset_settings()
        yield settings, redis_store
        redis_store.redis.close()
    finally:
        reset_settings()
        supervisor.stop_all(grace_s=5)


def run(*args: str, expect: int = 0) -> dict:
    result = CliRunner().invoke(cli, ["--json", *args])
    assert result.exit_code == expect, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_check_lists_missing_blobs_and_exits_non_zero_then_migrate_copies_them(legacy):
    settings, redis_store = legacy
    target = BlobStore.from_settings(settings)
    assert target.kind == "fs"

    before = run("store", "check", expect=1)
    assert {m["kind"] for m in before["missing"]} == {"client", "server", "evk"}
    assert before["legacy_in_redis"] == 4 and before["stored"] == 0
    assert any("model m v1" in owner for m in before["missing"] for owner in m["referenced_by"])

    moved = run("store", "migrate")
    assert (moved["copied"], moved["already"], moved["left_in_source"], moved["deleted_from_source"]) == (3, 0, 1, 0)
    assert moved["copied_bytes"] == len(CLIENT) + len(SERVER) + len(KEY)
    assert target.get(BlobKind.EVALUATION_KEY, sha256_hex(KEY)) == KEY
    assert run("store", "migrate")["copied"] == 0  # idempotent: a second run copies nothing

    after = run("store", "check")
    assert after["ok"] and after["missing"] == [] and after["stored"] == 3 and after["orphans"] == []

    cleaned = run("store", "migrate", "--delete-source")
    assert (cleaned["already"], cleaned["deleted_from_source"]) == (3, 4)
    assert redis_store.blobs() == {}
    assert run("store", "check")["legacy_in_redis"] == 0


def test_migrate_resumes_after_a_stop_and_verifies_what_it_copied(legacy):
    settings, redis_store = legacy
    target = BlobStore.from_settings(settings)
    target.put(BlobKind.CLIENT_ZIP, CLIENT)  # a run that stopped after its first blob
    assert run("store", "migrate")["already"] == 1
    # A blob whose copy in the store is corrupt is refused before its source is removed.
    path = target.backend.path(f"cipherpool:blob:server:{sha256_hex(SERVER)}")
    path.write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["store", "migrate", "--delete-source"])
    assert result.exit_code != 0
    assert redis_store.exists(BlobKind.SERVER_ZIP, sha256_hex(SERVER))


def test_check_lists_orphans_in_the_store(legacy):
    settings, _ = legacy
    run("store", "migrate", "--delete-source")
    BlobStore.from_settings(settings).put(BlobKind.EVALUATION_KEY, ORPHAN)
    report = run("store", "check")
    assert report["ok"] and [o["blob_id"] for o in report["orphans"]] == [sha256_hex(ORPHAN)]
    text = CliRunner().invoke(cli, ["store", "check"])
    assert text.exit_code == 0 and "orphans: 1" in text.output and "missing: 0" in text.output


# -- a node's disk cache -----------------------------------------------------------------------


def blob(n: int, size: int = 1000) -> tuple[str, bytes]:
    data = os.urandom(size - 8) + n.to_bytes(8, "big")
    return sha256_hex(data), data


def test_disk_cache_hits_misses_and_verifies(tmp_path):
    cache = DiskCache(tmp_path / "cache", 10_000)
    blob_id, data = blob(1)
    fetched = []
    fetch = lambda: fetched.append(1) or data  # noqa: E731
    assert cache.get("evk", blob_id, fetch) == data and cache.get("evk", blob_id, fetch) == data
    figures = cache.figures()
    assert (figures.hits, figures.misses, len(fetched)) == (1, 1, 1)
    assert (figures.fetched_bytes, figures.served_bytes, figures.bytes, figures.entries) == (1000, 1000, 1000, 1)
    path = tmp_path / "cache" / "evk" / blob_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_bytes(b"x" * 1000)  # corrupted on disk: refused, fetched again
    assert cache.get("evk", blob_id, fetch) == data and len(fetched) == 2 and cache.figures().corrupt == 1
    saved = read_figures(tmp_path / "cache")  # what a test or benchmark on the node's host reads
    assert saved is not None and (saved["hits"], saved["misses"], saved["corrupt"], saved["pid"]) == (1, 2, 1, os.getpid())


def test_disk_cache_is_bounded_in_bytes_least_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path / "cache", 3500)
    made = [blob(i) for i in range(4)]
    for blob_id, data in made[:3]:
        cache.get("evk", blob_id, lambda d=data: d)
    cache.get("evk", made[0][0], lambda: pytest.fail("a hit"))  # 0 used again: 1 is the oldest now
    cache.get("evk", made[3][0], lambda: made[3][1])
    assert [cache.contains("evk", b) for b, _ in made] == [True, False, True, True]
    assert cache.figures().evictions == 1 and cache.figures().bytes == 3000
    big_id, big = blob(9, 5000)
    assert cache.get("evk", big_id, lambda: big) == big and not cache.contains("evk", big_id)  # larger than it all


def test_a_restarted_node_reads_its_disk_cache_and_never_the_store(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data", blob_store="fs", blob_dir=tmp_path / "shared", broker_url="redis://127.0.0.1:1/0"
    )  # never reached: the blobs are files
    store = BlobStore.from_settings(settings)
    blob_id = store.put(BlobKind.EVALUATION_KEY, KEY)
    store.attach_cache(DiskCache(tmp_path / "cache", 10**6))
    assert store.get(BlobKind.EVALUATION_KEY, blob_id) == KEY
    store.delete(BlobKind.EVALUATION_KEY, blob_id)  # gone from the store: only the node's disk has it

    restarted = BlobStore.from_settings(settings)
    restarted.attach_cache(DiskCache(tmp_path / "cache", 10**6))  # a new process, the same folder
    assert restarted.get(BlobKind.EVALUATION_KEY, blob_id) == KEY
    assert (restarted.cache.figures().hits, restarted.cache.figures().misses) == (1, 0)
    with pytest.raises(NotFound):
        restarted.get(BlobKind.CLIENT_ZIP, blob_id)  # a miss still asks the store
