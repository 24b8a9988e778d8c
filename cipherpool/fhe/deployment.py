"""A concrete-ml deployment directory (what ``FHEModelDev(...).save()`` writes), checked.

Checked on the provider's machine before anything is uploaded, so that a wrong directory is
refused with a clear message instead of failing later on a pool node.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cipherpool import backends
from cipherpool.errors import InvalidDeployment, PayloadTooLarge, VersionMismatch

CLIENT_ZIP = "client.zip"
SERVER_ZIP = "server.zip"
VERSIONS_JSON = "versions.json"
CLIENT_MEMBERS = {"client.specs.json", "serialized_processing.json", VERSIONS_JSON}
SERVER_MEMBERS = {VERSIONS_JSON}
MAX_MEMBERS = 1000  # a concrete-ml zip holds a handful of files
MAX_VERSIONS_BYTES = 64 * 1024
CONFIGURATION_JSON = "configuration.json"  # concrete's Configuration, in a server.zip saved via MLIR
MAX_CONFIGURATION_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Versions:
    concrete_ml: str
    concrete_python: str
    python: str

    @classmethod
    def installed(cls) -> Versions:
        from importlib.metadata import version

        return cls(
            concrete_ml=version("concrete-ml"),
            concrete_python=version("concrete-python"),
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
        )

    def require_compatible(self, what: str) -> None:
        """Refuse to run a circuit compiled by other concrete versions (docs/architecture.md, 'Pitfalls designed around')."""
        here = Versions.installed()
        if (self.concrete_ml, self.concrete_python) != (here.concrete_ml, here.concrete_python) or (
            not self.python.startswith(here.python)
        ):
            raise VersionMismatch(
                f"{what} was built with concrete-ml {self.concrete_ml}, concrete-python "
                f"{self.concrete_python}, Python {self.python}; this process has concrete-ml "
                f"{here.concrete_ml}, concrete-python {here.concrete_python}, Python {here.python}. "
                "Install the same versions on both sides."
            )


@dataclass(frozen=True)
class Deployment:
    client_zip: bytes
    server_zip: bytes
    versions: Versions


def read_versions(zip_bytes: bytes, name: str) -> Versions:
    """The versions a zip was saved with. Any damage (a bad zip, a zip bomb in versions.json,
    deeply nested JSON, a bad deflate stream) is an InvalidDeployment, never another error."""
    try:
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
            info = zf.getinfo(VERSIONS_JSON)
            if info.file_size > MAX_VERSIONS_BYTES:
                raise ValueError(f"{VERSIONS_JSON} is {info.file_size} bytes")
            raw = json.loads(zf.read(info))
        return Versions(
            concrete_ml=str(raw["concrete-ml"]),
            concrete_python=str(raw["concrete-python"]),
            python=str(raw["python"]),
        )
    except Exception as exc:  # noqa: BLE001 - untrusted input: every failure is the same answer
        raise InvalidDeployment(f"{name} has no readable {VERSIONS_JSON} ({type(exc).__name__}).") from None


def check_artifact(data: bytes, name: str, *, max_unzipped_bytes: int | None = None) -> Versions:
    """Check a client.zip or server.zip without extracting it: a zip, with the members
    concrete-ml writes, whose declared sizes add up to at most ``max_unzipped_bytes`` (zipfile
    never inflates a member past its declared size, so this bounds a zip bomb)."""
    members = CLIENT_MEMBERS if name == CLIENT_ZIP else SERVER_MEMBERS
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except Exception:  # noqa: BLE001
        raise InvalidDeployment(f"{name} is not a zip archive.") from None
    if len(infos) > MAX_MEMBERS:
        raise InvalidDeployment(f"{name} has {len(infos)} members; a concrete-ml deployment has a handful.")
    unzipped = sum(i.file_size for i in infos)
    if max_unzipped_bytes is not None and unzipped > max_unzipped_bytes:
        raise PayloadTooLarge(f"{name} unpacks to {unzipped} bytes, above the limit of {max_unzipped_bytes}.")
    missing = members - {i.filename for i in infos}
    if missing:
        raise InvalidDeployment(f"{name} lacks {', '.join(sorted(missing))}.")
    return read_versions(data, name)


def check_pair(client_zip: bytes, server_zip: bytes, *, max_unzipped_bytes: int | None = None) -> Versions:
    versions = check_artifact(server_zip, SERVER_ZIP, max_unzipped_bytes=max_unzipped_bytes)
    if check_artifact(client_zip, CLIENT_ZIP, max_unzipped_bytes=max_unzipped_bytes) != versions:
        raise InvalidDeployment("client.zip and server.zip were saved by different versions.")
    return versions


def load_deployment(path: str | Path) -> Deployment:
    """Read and check a deployment directory; raises InvalidDeployment with what is wrong."""
    root = Path(path)
    hint = "Pass the directory written by concrete-ml's FHEModelDev(path, model).save()."
    if not root.is_dir():
        raise InvalidDeployment(f"{root} is not a directory. {hint}")
    files = {name: root / name for name in (CLIENT_ZIP, SERVER_ZIP)}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise InvalidDeployment(f"{root} has no {' or '.join(missing)}. {hint}")
    client_zip, server_zip = (files[n].read_bytes() for n in (CLIENT_ZIP, SERVER_ZIP))
    versions = check_pair(client_zip, server_zip)
    return Deployment(client_zip=client_zip, server_zip=server_zip, versions=versions)


def compiled_backend(server_zip: bytes) -> str:
    """The name of the backend a circuit was compiled for (:mod:`cipherpool.backends`), from
    the configuration in its server.zip.

    concrete-ml saves the server side as MLIR with concrete's configuration, and a node compiles
    it when it loads it, for the backend that configuration names (``use_gpu``). The node must
    honour it rather than choose: a GPU compilation picks its own crypto parameters, so the
    client's keys fit only the backend the provider compiled for. A zip without the
    configuration (a shared library saved without MLIR) runs where it was built: the registry's
    fallback, the CPU."""
    try:
        with zipfile.ZipFile(io.BytesIO(server_zip)) as zf:
            info = zf.getinfo(CONFIGURATION_JSON)
            if info.file_size > MAX_CONFIGURATION_BYTES:
                raise ValueError(f"{CONFIGURATION_JSON} is {info.file_size} bytes")
            configuration = json.loads(zf.read(info))
    except KeyError:
        configuration = {}
    except Exception as exc:  # noqa: BLE001 - untrusted input: every failure is the same answer
        raise InvalidDeployment(f"{SERVER_ZIP} has an unreadable {CONFIGURATION_JSON} ({type(exc).__name__}).") from None
    return backends.compiled_for(configuration if isinstance(configuration, dict) else {})


@dataclass(frozen=True)
class InputSpec:
    """What a model's first input looks like, read from client.zip: the clear shape a client
    encrypts, and its type (the quantizer's float type and the encrypted integer it becomes)."""

    shape: list[int] | None = None
    dtype: str | None = None


def input_spec(client_zip: bytes) -> InputSpec:
    """Best effort: an unknown layout (another concrete version) gives an empty spec, never an error."""
    try:
        with zipfile.ZipFile(io.BytesIO(client_zip)) as zf:
            specs = json.loads(zf.read("client.specs.json"))
            processing = json.loads(zf.read("serialized_processing.json"))
        lwe = specs["circuits"][0]["inputs"][0]["typeInfo"]["lweCiphertext"]
        shape = [int(d) for d in lwe["abstractShape"]["dimensions"]]
        integer = lwe["encoding"]["integer"]
        encrypted = f"{'int' if integer.get('isSigned') else 'uint'}{int(integer['width'])}"
        quantizer = processing.get("input_quantizers", [{}])[0].get("serialized_value", {})
        clear = (quantizer.get("scale") or {}).get("dtype") if isinstance(quantizer, dict) else None
        return InputSpec(shape, f"{clear} -> {encrypted}" if clear else encrypted)
    except Exception:  # noqa: BLE001 - informative only
        return InputSpec()
