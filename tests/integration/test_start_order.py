"""Any start order: every platform process started before the broker and the database (not
even migrated yet) waits for them and comes up by itself; a node whose registration is lost
registers again. Real processes, each with a data directory of its own, as on separate hosts."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis
from sqlalchemy import delete
from sqlalchemy.exc import DBAPIError

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.celery import create_app
from cipherpool.config.settings import Settings
from cipherpool.db import init_db, session_scope
from cipherpool.db.tables import NodeStatus, PoolNode
from cipherpool.names import CONTROL_QUEUE, POOL_QUEUE
from cipherpool.stack.redis_server import find_redis_server, write_config
from cipherpool.stack.supervisor import Supervisor, free_port
from cipherpool.waiting import wait_until
from tests.conftest import _postgres_database, _postgres_reachable

pytestmark = pytest.mark.integration
CELERY = [sys.executable, "-m", "celery", "-A", "cipherpool.tasks"]
HEARTBEAT_S = 1.0


@contextlib.contextmanager
def _database(tmp_path: Path):
    """A database that exists but has no schema: PostgreSQL where the machine has it."""
    if _postgres_reachable():
        with _postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'db' / 'cipherpool.db'}"


def _http(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def _online(db_url: str, name: str) -> bool:
    try:
        with session_scope(db_url) as s:
            node = s.get(PoolNode, name)
            return node is not None and node.status == NodeStatus.ONLINE
    except DBAPIError:  # no schema yet
        return False


def test_every_process_started_before_broker_and_database_comes_up_by_itself(examples, tmp_path):
    redis_dir, port, secret = tmp_path / "redis", free_port(), "start-order-secret"
    broker_url = f"redis://:{secret}@127.0.0.1:{port}/0"
    gateway_port = free_port()
    node_name = "node1@start-order"
    supervisor = Supervisor(tmp_path / "logs")
    timings: dict[str, float] = {}
    with _database(tmp_path) as db_url:

        def env(host: str) -> dict[str, str]:
            data = tmp_path / host  # no shared filesystem: a data directory per "host"
            return {
                "PATH": "/usr/bin:/bin",
                "HOME": str(data),
                "TMPDIR": str(tmp_path),
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                "CIPHERPOOL_BROKER_URL": broker_url,
                "CIPHERPOOL_DATABASE_URL": db_url,
                "CIPHERPOOL_DATA_DIR": str(data),
                "CIPHERPOOL_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
                "CIPHERPOOL_RECONCILE_INTERVAL_S": "2",
            }

        try:
            # Given every platform process started first: no broker, no database schema
            supervisor.start(
                "gateway",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "cipherpool.gateway.app:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(gateway_port),
                    "--log-level",
                    "info",
                ],
                env("gateway"),
            )
            quiet = ["--without-gossip", "--without-mingle", "--loglevel", "INFO"]
            supervisor.start(
                "control",
                CELERY + ["worker", "-Q", CONTROL_QUEUE, "-P", "threads", "-c", "2", "-n", "control@start-order", *quiet],
                env("control"),
            )
            supervisor.start(
                "node1", CELERY + ["worker", "-Q", POOL_QUEUE, "-P", "threads", "-c", "1", "-n", node_name, *quiet], env("node1")
            )
            (tmp_path / "beat").mkdir()
            supervisor.start(
                "beat", CELERY + ["beat", "-s", str(tmp_path / "beat" / "schedule"), "--loglevel", "INFO"], env("beat")
            )
            gateway = f"http://127.0.0.1:{gateway_port}"
            wait_until(lambda: _http(gateway + "/v1/health")[0] == 200, 60, interval_s=0.2)
            time.sleep(3)
            # Then they wait: alive, the gateway live but not ready
            assert supervisor.dead() == [], [c.name for c in supervisor.dead()]
            status, body = _http(gateway + "/v1/ready")
            assert status == 503, body

            # When the broker comes up
            config = write_config(redis_dir, port, secret, 512 * 1024**2)
            supervisor.start("redis", [find_redis_server(), str(config)], {"PATH": "/usr/bin:/bin"})
            up = time.monotonic()
            app = create_app(Settings(broker_url=broker_url), name="start-order-test")
            try:
                wait_until(lambda: app.control.ping(destination=["control@start-order"], timeout=0.5), 90)
                timings["control answers after the broker"] = time.monotonic() - up
            finally:
                app.close()
            time.sleep(2)
            assert not _online(db_url, node_name)  # no schema yet: nothing registered

            # And the schema is migrated afterwards
            init_db(db_url)
            migrated = time.monotonic()
            wait_until(lambda: _online(db_url, node_name), 60)
            timings["node registered after the migration"] = time.monotonic() - migrated
            wait_until(lambda: _http(gateway + "/v1/ready")[0] == 200, 60)
            timings["gateway ready after the migration"] = time.monotonic() - migrated
            assert supervisor.dead() == [], [c.name for c in supervisor.dead()]

            # Then a node whose registration is lost registers again by itself
            with session_scope(db_url) as s:
                s.execute(delete(PoolNode).where(PoolNode.name == node_name))  # type: ignore[arg-type]
            lost = time.monotonic()
            wait_until(lambda: _online(db_url, node_name), 30)
            timings["node registered again after its row was lost"] = time.monotonic() - lost

            # And the platform serves: deploy, start a worker, query through the gateway
            from cipherpool.services.accounts import create_account

            with session_scope(db_url) as s:
                api_key = create_account(s, "provider", signup_grant=10**12)[1]
            settings = Settings(url=gateway, data_dir=tmp_path / "client", query_timeout_s=120)
            example = examples["cancer"]
            with ManagementClient(api_key, settings=settings) as mc:
                mc.deploy_model("cancer", example.path)
                mc.activate_model("cancer")
                mc.start_worker("cancer")
                token = mc.create_token("u", model="cancer")
            with QueryClient(token, settings=settings, key_dir=tmp_path / "keys") as qc:
                qc.generate_keys()
                qc.upload_evaluation_keys()
                x = example.x_test[:1]
                np.testing.assert_allclose(qc.predict(x[0]), example.clear(x), atol=1e-3)
            assert redis.Redis.from_url(broker_url).ping()
            assert supervisor.dead() == []
            print("\nstart order:", ", ".join(f"{what} {s:.1f} s" for what, s in timings.items()))
        finally:
            supervisor.stop_all()
