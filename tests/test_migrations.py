"""Schema migrations (cipherpool/db/migrations), on SQLite and on PostgreSQL (skipped when no
server answers on 127.0.0.1:5432), each test on a database of its own.

Rows are written and read through tables reflected from the database, not through the
models: a row inserted at the baseline must keep meaning the baseline's columns when later
migrations change tables.py."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlmodel import SQLModel, select

from cipherpool.cli import cli
from cipherpool.clock import aware
from cipherpool.config.settings import mask_url, reset_settings
from cipherpool.db import current_revision, get_engine, head_revision, init_db, session_scope, upgrade_db
from cipherpool.db.migrate import BASELINE_REVISION, BASELINE_TABLES, VERSION_TABLE, alembic_config
from cipherpool.db.tables import (
    AccessToken,
    Account,
    EvaluationKey,
    LedgerEntry,
    Model,
    ModelStatus,
    ModelVersion,
    PoolNode,
    TokenModel,
    Worker,
    WorkerStatus,
)
from cipherpool.errors import ConfigurationError, InvalidInput

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

# One row per table, in the baseline's columns; statuses stored by name, as SQLAlchemy stores
# a Python enum. evaluation_keys.id is left to the database (its sequence must move on).
BASELINE_ROWS: dict[str, dict[str, Any]] = {
    "accounts": {
        "id": "acct0000000001",
        "name": "acme",
        "api_key_hash": "a" * 64,
        "api_key_prefix": "cpk_abcd",
        "created_at": T0,
    },
    "models": {
        "id": "model000000001",
        "account_id": "acct0000000001",
        "name": "digits",
        "status": "ACTIVE",
        "hardware": "cpu",
        "client_blob": "c" * 64,
        "server_blob": "s" * 64,
        "concrete_ml_version": "1.9.0",
        "concrete_python_version": "2.10.0",
        "python_version": "3.11.9",
        "created_at": T0,
        "updated_at": T0,
    },
    "access_tokens": {
        "id": "token000000001",
        "account_id": "acct0000000001",
        "model_id": "model000000001",
        "name": "ci",
        "token_hash": "t" * 64,
        "prefix": "cpt_abcd",
        "created_at": T0,
        "expires_at": T0 + timedelta(days=1),
        "revoked_at": None,
    },
    "evaluation_keys": {
        "key_id": "key00000000001",
        "blob_id": "b" * 64,
        "token_id": "token000000001",
        "model_id": "model000000001",
        "size_bytes": 64,
        "created_at": T0,
    },
    "pool_nodes": {
        "name": "node1@host",
        "host_class": "cpu",
        "concurrency": 1,
        "threads": 2,
        "status": "ONLINE",
        "worker_id": "work0000000001",
        "pid": 4242,
        "started_at": T0,
        "last_seen": T0,
    },
    "workers": {
        "id": "work0000000001",
        "account_id": "acct0000000001",
        "model_id": "model000000001",
        "node_name": "node1@host",
        "status": "RUNNING",
        "error": None,
        "created_at": T0,
        "started_at": T0,
        "stopped_at": None,
    },
}
assert set(BASELINE_ROWS) == BASELINE_TABLES


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test's own."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    yield url
    get_engine(url).dispose()


def _tables(conn: sa.Connection) -> dict[str, sa.Table]:
    metadata = sa.MetaData()
    metadata.reflect(conn)
    return dict(metadata.tables)


def _insert_baseline_rows(url: str) -> None:
    with get_engine(url).begin() as conn:
        tables = _tables(conn)
        for name in ("accounts", "models", "access_tokens", "evaluation_keys", "pool_nodes", "workers"):
            conn.execute(sa.insert(tables[name]), BASELINE_ROWS[name])


def _snapshot(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of our tables, as the database returns them, in a stable order."""
    with get_engine(url).connect() as conn:
        tables = _tables(conn)
        return {
            name: [dict(row._mapping) for row in conn.execute(sa.select(tables[name]).order_by(*tables[name].primary_key))]
            for name in sorted(BASELINE_TABLES & set(tables))
        }


# Values a migration rewrites on purpose: 0003 stores a worker's status as its value.
RECODED = {("workers", "status"): {"RUNNING": "up"}}


def _assert_kept(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> None:
    """Same rows, and in every column that still exists the same values (or their recoding)."""
    for name, rows in before.items():
        assert len(after[name]) == len(rows) == 1, name
        for old, new in zip(rows, after[name]):
            expected = {k: RECODED.get((name, k), {}).get(v, v) for k, v in old.items() if k in new}
            assert {k: new[k] for k in old if k in new} == expected, name


def _assert_the_models_read_them(url: str) -> None:
    with session_scope(url) as session:
        assert session.get(Account, "acct0000000001").name == "acme"
        assert session.get(Model, "model000000001").status is ModelStatus.ACTIVE
        token = session.get(AccessToken, "token000000001")
        assert token.expires_at == T0 + timedelta(days=1) and token.revoked_at is None
        assert session.get(PoolNode, "node1@host").worker_id == "work0000000001"
        assert session.get(Worker, "work0000000001").status is WorkerStatus.UP
        # 0002: the model's artifact is its version 1, the token's model its one assignment,
        # and the key remembers the client specs it was made from.
        model = session.get(Model, "model000000001")
        (version,) = session.exec(select(ModelVersion)).all()
        settings = (model.version, model.rollout_version, model.min_workers, model.max_workers, model.shared)
        assert settings == (1, None, 0, 1, False)
        assert (
            version.model_id,
            version.number,
            version.client_blob,
            version.server_blob,
            version.concrete_ml_version,
            version.python_version,
        ) == (model.id, 1, "c" * 64, "s" * 64, "1.9.0", "3.11.9")
        (link,) = session.exec(select(TokenModel)).all()
        assert (link.token_id, link.model_id) == (token.id, model.id)
        (key,) = session.exec(select(EvaluationKey)).all()
        assert key.client_blob == "c" * 64
        # 0004: the account's opening grant is its first ledger line and its balance, and the
        # running worker is charged from the upgrade on, not from when it started.
        account = session.get(Account, "acct0000000001")
        (line,) = session.exec(select(LedgerEntry)).all()
        assert (line.account_id, line.kind, line.amount, line.balance_after) == (account.id, "grant", 100_000_000, 100_000_000)
        assert account.balance_micro == 100_000_000 and account.low_balance_at is None
        worker = session.get(Worker, "work0000000001")
        assert worker.billed_to is not None and aware(worker.billed_to) > T0 and worker.billed_remainder == 0
        # A row added now gets a fresh id: the sequence moved on past the migrated row.
        session.add(
            EvaluationKey(
                key_id="key00000000002",
                blob_id="b" * 64,
                token_id=token.id,
                model_id=model.id,
                client_blob="c" * 64,
                size_bytes=64,
            )
        )
        session.flush()
        assert len({k.id for k in session.exec(select(EvaluationKey)).all()} - {key.id}) == 1


def _pre_migration_database(url: str) -> None:
    """A database as `init_db` made it before migrations: create_all, no alembic_version.
    While the head is the baseline that is today's create_all; once later migrations change
    tables.py, the baseline migration without its version table is that schema."""
    if head_revision() == BASELINE_REVISION:
        SQLModel.metadata.create_all(get_engine(url))
    else:
        upgrade_db(url, BASELINE_REVISION)
        with get_engine(url).begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))


def test_rows_written_at_the_baseline_survive_every_later_migration(url: str) -> None:
    first = upgrade_db(url, BASELINE_REVISION)
    assert (first.from_revision, first.to_revision, first.adopted) == (None, BASELINE_REVISION, False)
    assert current_revision(url) == BASELINE_REVISION
    _insert_baseline_rows(url)
    before = _snapshot(url)

    done = upgrade_db(url)

    assert done.from_revision == BASELINE_REVISION and done.to_revision == head_revision() == current_revision(url)
    _assert_kept(before, _snapshot(url))
    _assert_the_models_read_them(url)


def test_the_models_and_the_migrations_agree(url: str) -> None:
    """The check that makes every change to tables.py come with its migration."""
    upgrade_db(url)
    with get_engine(url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": conn.dialect.name == "sqlite"})
        diff = compare_metadata(context, SQLModel.metadata)
    assert diff == [], f"tables.py and cipherpool/db/migrations differ; add a migration (see alembic.ini): {diff}"


def test_a_database_from_before_migrations_is_stamped_and_upgraded(url: str) -> None:
    _pre_migration_database(url)
    _insert_baseline_rows(url)
    before = _snapshot(url)
    assert current_revision(url) is None

    done = init_db(url)  # what `up` and `admin` call

    assert done.adopted and done.from_revision is None and done.to_revision == head_revision() == current_revision(url)
    _assert_kept(before, _snapshot(url))
    _assert_the_models_read_them(url)


def test_upgrading_again_changes_nothing(url: str) -> None:
    assert upgrade_db(url).changed
    _insert_baseline_rows(url)
    before = _snapshot(url)
    again = upgrade_db(url)
    assert not again.changed and again.from_revision == again.to_revision == head_revision()
    assert not init_db(url).changed
    assert _snapshot(url) == before


def test_the_migrations_go_down_to_nothing_and_up_again(url: str) -> None:
    upgrade_db(url)
    with get_engine(url).connect() as conn:
        command.downgrade(alembic_config(url, conn), "base")
        conn.commit()
        assert set(sa.inspect(conn).get_table_names()) <= {VERSION_TABLE}
    assert current_revision(url) is None
    assert upgrade_db(url).to_revision == head_revision()  # PostgreSQL: the enum types went too


def test_a_database_whose_tables_were_dropped_is_built_again(url: str) -> None:
    """metadata.drop_all (tests/conftest.py's PostgreSQL teardown) leaves alembic_version."""
    upgrade_db(url)
    SQLModel.metadata.drop_all(get_engine(url))
    assert current_revision(url) == head_revision()
    done = upgrade_db(url)
    assert done.from_revision is None and done.to_revision == head_revision()
    _insert_baseline_rows(url)


def test_half_a_pre_migration_schema_is_refused_and_left_alone(url: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id VARCHAR PRIMARY KEY)"))
    with pytest.raises(ConfigurationError, match="evaluation_keys"):
        upgrade_db(url)
    with get_engine(url).connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"accounts"}


def test_a_database_migrated_by_a_newer_version_is_refused(url: str) -> None:
    upgrade_db(url)
    with get_engine(url).begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    with pytest.raises(ConfigurationError, match="9999_from_the_future"):
        upgrade_db(url)
    assert current_revision(url) == "9999_from_the_future"


def test_an_unknown_target_revision_is_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput, match="no_such_revision"):
        upgrade_db(url, "no_such_revision")
    assert current_revision(url) is None


def test_concurrent_upgrades_migrate_once(url: str) -> None:
    """`up` and `admin account create` may start together on a new data dir: one migrates,
    the other waits for the lock and finds nothing to do."""
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(upgrade_db(url))
        except Exception as exc:  # surfaced by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(not isinstance(r, Exception) for r in results) and len(results) == 2, results
    assert sorted(r.changed for r in results) == [False, True]
    assert current_revision(url) == head_revision()


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def cli_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """CIPHERPOOL_* pointing at a data dir (SQLite inside it) or a fresh PostgreSQL database;
    yields the database URL."""
    monkeypatch.setenv("CIPHERPOOL_DATA_DIR", str(tmp_path / "data"))
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'cipherpool.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        monkeypatch.setenv("CIPHERPOOL_DATABASE_URL", url)
    reset_settings()
    yield url
    reset_settings()
    get_engine(url).dispose()


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_db_upgrade_and_current(cli_env: str) -> None:
    head = head_revision()
    status = json.loads(_invoke("--json", "db", "current").output)
    assert status["current"] is None and status["head"] == head and status["up_to_date"] is False
    if cli_env.startswith("sqlite"):
        assert not _sqlite_path(cli_env).exists()  # asking creates nothing

    first = _invoke("db", "upgrade").output
    assert f"empty -> {head}" in first
    assert f"already at {head}" in _invoke("db", "upgrade").output
    assert f"already at {head}" in _invoke("db", "init").output  # the old name, an alias
    assert json.loads(_invoke("--json", "db", "upgrade").output) == {
        "from": head,
        "to": head,
        "adopted": False,
        "changed": False,
        "database": mask_url(cli_env),
    }

    status = json.loads(_invoke("--json", "db", "current").output)
    assert status["current"] == status["head"] == head and status["up_to_date"] is True
    assert f"current: {head}" in _invoke("db", "current").output
    assert status["database"] == mask_url(cli_env)
    if cli_env.startswith("sqlite"):
        assert _sqlite_path(cli_env).stat().st_mode & 0o777 == 0o600  # hashes of keys and tokens


def test_db_upgrade_to_a_revision_and_a_bad_one(cli_env: str) -> None:
    assert f"empty -> {BASELINE_REVISION}" in _invoke("db", "upgrade", "--revision", BASELINE_REVISION).output
    bad = CliRunner().invoke(cli, ["db", "upgrade", "--revision", "no_such_revision"])
    assert bad.exit_code == 6 and "error [invalid_input]" in bad.output and "no_such_revision" in bad.output


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def test_workers_that_ended_before_credits_owe_nothing(url: str) -> None:
    # Given a worker that ran for 30 days and stopped 60 days before the upgrade to 0004
    upgrade_db(url, "0003_pool")
    long_ago = datetime.now(UTC) - timedelta(days=90)
    with get_engine(url).begin() as conn:
        tables = _tables(conn)
        conn.execute(sa.insert(tables["accounts"]), {**BASELINE_ROWS["accounts"]})
        conn.execute(
            sa.insert(tables["models"]),
            {
                "id": "model000000001",
                "account_id": "acct0000000001",
                "name": "digits",
                "status": "ACTIVE",
                "hardware": "cpu",
                "created_at": T0,
                "updated_at": T0,
            },
        )
        conn.execute(
            sa.insert(tables["pool_nodes"]),
            {"name": "node1@host", "host_class": "cpu", "concurrency": 1, "status": "ONLINE", "started_at": T0, "last_seen": T0},
        )
        conn.execute(
            sa.insert(tables["workers"]),
            {
                "id": "work0000000002",
                "account_id": "acct0000000001",
                "model_id": "model000000001",
                "node_name": "node1@host",
                "status": "stopped",
                "created_at": long_ago,
                "started_at": long_ago,
                "stopped_at": long_ago + timedelta(days=30),
            },
        )
    # When the database is upgraded
    upgrade_db(url)
    # Then it is settled up to its stop: no tick charges its past
    from cipherpool.billing.charging import unbilled_workers

    with session_scope(url) as session:
        worker = session.get(Worker, "work0000000002")
        assert worker.billed_to == worker.stopped_at
        assert unbilled_workers(session) == []
        assert session.get(Account, "acct0000000001").balance_micro == 100_000_000


def test_0007_turns_the_gpu_build_into_capabilities_and_back(url: str) -> None:
    # Given a plain node and one with concrete's GPU build, as 0006 recorded them
    upgrade_db(url, "0006_backends")
    node = {"host_class": "gpu", "concurrency": 1, "status": "ONLINE", "started_at": T0, "last_seen": T0}
    with get_engine(url).begin() as conn:
        pool_nodes = _tables(conn)["pool_nodes"]
        conn.execute(
            sa.insert(pool_nodes),
            [{**node, "name": "plain@host", "gpu_build": False}, {**node, "name": "built@host", "gpu_build": True}],
        )
    # When the database is upgraded, the flag becomes the backends each node can run
    upgrade_db(url)
    with session_scope(url) as session:
        assert {n.name: json.loads(n.capabilities) for n in session.exec(select(PoolNode))} == {
            "plain@host": ["cpu"],
            "built@host": ["cpu", "gpu"],
        }
    with get_engine(url).connect() as conn:
        assert "gpu_build" not in {c["name"] for c in sa.inspect(conn).get_columns("pool_nodes")}
        # And the downgrade gives the flag back where the capabilities name the GPU
        command.downgrade(alembic_config(url, conn), "0006_backends")
        conn.commit()
        columns = {c["name"] for c in sa.inspect(conn).get_columns("pool_nodes")}
        flags = dict(conn.execute(sa.text("SELECT name, gpu_build FROM pool_nodes")).all())
    assert "capabilities" not in columns
    assert {name: bool(flag) for name, flag in flags.items()} == {"plain@host": False, "built@host": True}


def test_0008_gives_existing_key_sets_a_whole_idle_period_and_the_downgrade_drops_expired_ones(url: str) -> None:
    # Given a key set uploaded long ago, as 0007 recorded it
    upgrade_db(url, "0007_capabilities")
    long_ago = datetime.now(UTC) - timedelta(days=400)
    with get_engine(url).begin() as conn:
        tables = _tables(conn)
        conn.execute(sa.insert(tables["accounts"]), BASELINE_ROWS["accounts"])
        conn.execute(
            sa.insert(tables["models"]),
            {
                "id": "model000000001",
                "account_id": "acct0000000001",
                "name": "digits",
                "status": "ACTIVE",
                "hardware": "cpu",
                "created_at": T0,
                "updated_at": T0,
            },
        )
        conn.execute(
            sa.insert(tables["access_tokens"]),
            {
                "id": "token000000001",
                "account_id": "acct0000000001",
                "name": "ci",
                "token_hash": "t" * 64,
                "prefix": "cpt_abcd",
                "created_at": T0,
            },
        )
        conn.execute(
            sa.insert(tables["evaluation_keys"]),
            [
                {
                    "key_id": k,
                    "blob_id": k[0] * 64,
                    "token_id": "token000000001",
                    "model_id": "model000000001",
                    "client_blob": "c" * 64,
                    "size_bytes": 64,
                    "created_at": long_ago,
                }
                for k in ("a" * 32, "b" * 32)
            ],
        )
    before = datetime.now(UTC)
    # When the database is upgraded
    upgrade_db(url, "0008_key_lifecycle")
    # Then neither key set counts as idle since its upload: each was last used at the upgrade
    with get_engine(url).begin() as conn:
        tables = _tables(conn)
        rows = conn.execute(sa.select(tables["evaluation_keys"])).mappings().all()
        assert {aware(r["last_used_at"]) >= before - timedelta(seconds=1) for r in rows} == {True}
        assert {r["expired_at"] for r in rows} == {None}
        # and blobs can be marked for the sweep
        conn.execute(sa.insert(tables["blob_candidates"]), {"kind": "evk", "blob_id": "b" * 64, "marked_at": T0})
        # When one key set expires and the schema goes back to 0007
        conn.execute(
            sa.update(tables["evaluation_keys"]).where(tables["evaluation_keys"].c.key_id == "b" * 32).values(expired_at=T0)
        )
    with get_engine(url).connect() as conn:
        command.downgrade(alembic_config(url, conn), "0007_capabilities")
        conn.commit()
        # Then the expired one is gone (its blob may be), the live one stays, and so do the marks' blobs
        assert [r[0] for r in conn.execute(sa.text("SELECT key_id FROM evaluation_keys"))] == ["a" * 32]
        assert "blob_candidates" not in sa.inspect(conn).get_table_names()
        assert "last_used_at" not in {c["name"] for c in sa.inspect(conn).get_columns("evaluation_keys")}
    # And it upgrades again
    upgrade_db(url)
    with session_scope(url) as session:
        assert [k.key_id for k in session.exec(select(EvaluationKey))] == ["a" * 32]


def test_0009_gives_events_ledger_lines_and_alert_events_opaque_ids_and_goes_back(url: str) -> None:
    # Given model events, ledger lines and an alert event numbered by the platform-wide sequence, as 0008 left them
    upgrade_db(url, "0008_key_lifecycle")
    with get_engine(url).begin() as conn:
        tables = _tables(conn)
        conn.execute(sa.insert(tables["accounts"]), BASELINE_ROWS["accounts"])
        conn.execute(
            sa.insert(tables["models"]),
            {
                "id": "model000000001",
                "account_id": "acct0000000001",
                "name": "digits",
                "status": "ACTIVE",
                "hardware": "cpu",
                "created_at": T0,
                "updated_at": T0,
            },
        )
        conn.execute(
            sa.insert(tables["model_events"]),
            [
                {
                    "account_id": "acct0000000001",
                    "model_id": "model000000001",
                    "at": T0,
                    "kind": "deployed",
                    "message": f"event {i}",
                }
                for i in range(3)
            ],
        )
        conn.execute(
            sa.insert(tables["ledger"]),
            [
                {
                    "account_id": "acct0000000001",
                    "at": T0,
                    "kind": "grant",
                    "amount": 5,
                    "balance_after": 5 * (i + 1),
                    "key": f"grant:{i}",
                    "note": "",
                }
                for i in range(2)
            ],
        )
        conn.execute(
            sa.insert(tables["alert_events"]),
            {
                "rule_id": "rule0000000001",
                "account_id": "acct0000000001",
                "model_id": "model000000001",
                "metric": "error_rate",
                "kind": "fired",
                "threshold": 0.1,
                "at": T0,
                "delivery": "none",
                "attempts": 0,
            },
        )
    # When the database is upgraded
    upgrade_db(url, "0009_public_ids")
    # Then every row has an opaque id of its kind, unique, and the models read them
    from cipherpool.db.tables import AlertEvent, ModelEvent

    with session_scope(url) as session:
        found = {
            "ev_": [e.public_id for e in session.exec(select(ModelEvent))],
            "ln_": [x.public_id for x in session.exec(select(LedgerEntry))],
            "al_": [a.public_id for a in session.exec(select(AlertEvent))],
        }
        assert [len(ids) for ids in found.values()] == [3, 2, 1]
        every = [i for ids in found.values() for i in ids]
        assert len(set(every)) == len(every)
        assert all(re.fullmatch(prefix + "[0-9a-f]{16}", i) for prefix, ids in found.items() for i in ids), found
        # and a row added now gets one of its own
        session.add(ModelEvent(account_id="acct0000000001", model_id="model000000001", kind="activated", message="new"))
        session.flush()
        (new,) = session.exec(select(ModelEvent).where(ModelEvent.message == "new")).all()
        assert new.public_id.startswith("ev_") and new.public_id not in every
    # and the database refuses a second row with the same one
    with get_engine(url).connect() as conn, pytest.raises(sa.exc.IntegrityError):
        model_events = _tables(conn)["model_events"]
        conn.execute(
            sa.insert(model_events),
            {
                "account_id": "acct0000000001",
                "model_id": "model000000001",
                "at": T0,
                "kind": "deployed",
                "message": "twin",
                "public_id": found["ev_"][0],
            },
        )
    # When the schema goes back to 0008, the columns go and the rows stay; it upgrades again
    with get_engine(url).connect() as conn:
        command.downgrade(alembic_config(url, conn), "0008_key_lifecycle")
        conn.commit()
        for name in ("model_events", "ledger", "alert_events"):
            assert "public_id" not in {c["name"] for c in sa.inspect(conn).get_columns(name)}, name
        assert conn.execute(sa.text("SELECT count(*) FROM model_events")).scalar() == 4
    upgrade_db(url)
    with session_scope(url) as session:
        assert len({e.public_id for e in session.exec(select(ModelEvent))}) == 4
