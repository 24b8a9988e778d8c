"""Helpers shared by test modules."""

import io
import json
import zipfile

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
