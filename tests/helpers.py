"""Helpers shared by test modules."""

import contextlib
import io
import json
import zipfile
from collections.abc import Iterator

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
