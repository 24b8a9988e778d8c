"""Helpers shared by test modules."""

import contextlib
import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

from cipherpool.fhe.deployment import Versions


def zip_bytes(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def versions_json(**over: str) -> str:
    here = Versions.installed()
    return json.dumps({"concrete-ml": here.concrete_ml, "concrete-python": here.concrete_python, "python": here.python, **over})


def make_deployment(path, client: bytes | None = None, server: bytes | None = None):
    """A directory that passes the provider-side checks (it holds no real circuit)."""
    path.mkdir(parents=True, exist_ok=True)
    client_files = {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()}
    (path / "client.zip").write_bytes(client if client is not None else zip_bytes(client_files))
    (path / "server.zip").write_bytes(server if server is not None else zip_bytes({"versions.json": versions_json()}))
    return path


def value_ciphertext(*args, **kwargs) -> bytes:
    """A concrete ``Value`` message, as :func:`cipherpool.fhe.values.build_value` makes one."""
    from cipherpool.fhe.values import build_value

    return build_value(*args, **kwargs)


@contextlib.contextmanager
def own_redis(tmp_path_factory, name: str, maxmemory_bytes: int = 64 * 1024**2) -> Iterator[str]:
    """A redis-server of the test's own (a free loopback port, a password), stopped by its pid;
    yields its URL. For a module's fixture: ``with own_redis(tmp_path_factory, "x") as url``."""
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    tmp = tmp_path_factory.mktemp(name)
    supervisor = Supervisor(tmp / "logs")
    try:
        _child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=maxmemory_bytes)
        yield url
    finally:
        supervisor.stop_all(grace_s=5)


@contextlib.contextmanager
def redis_broker_platform(redis_url: str, tmp_path, **settings) -> Iterator[tuple[Any, Any]]:
    """A platform context and a Celery app on ``redis_url`` as broker and store, the Redis
    emptied first (its ACL refuses FLUSHDB): for a test of what beat or a publisher does to the
    broker's queues. Yields ``(ctx, app)``."""
    import uuid

    from cipherpool.config.celery import create_app
    from cipherpool.config.settings import Settings
    from cipherpool.context import PlatformContext
    from cipherpool.store import redis_client

    client = redis_client(redis_url)
    for key in client.scan_iter():
        client.delete(key)
    ctx = PlatformContext(Settings(data_dir=tmp_path, broker_url=redis_url, **settings))
    app = create_app(ctx.settings, name=f"test-{uuid.uuid4().hex[:6]}")
    try:
        yield ctx, app
    finally:
        app.close()
        client.close()
