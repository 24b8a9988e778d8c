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

from cipherpool.errors import InvalidDeployment, VersionMismatch

CLIENT_ZIP = "client.zip"
SERVER_ZIP = "server.zip"
VERSIONS_JSON = "versions.json"
CLIENT_MEMBERS = {"client.specs.json", "serialized_processing.json", VERSIONS_JSON}
SERVER_MEMBERS = {VERSIONS_JSON}


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
        """Refuse to run a circuit compiled by other concrete versions (DESIGN.md §6)."""
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
    try:
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
            raw = json.loads(zf.read(VERSIONS_JSON))
        return Versions(
            concrete_ml=str(raw["concrete-ml"]),
            concrete_python=str(raw["concrete-python"]),
            python=str(raw["python"]),
        )
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise InvalidDeployment(f"{name} has no readable {VERSIONS_JSON} ({exc}).") from None


def _check_zip(data: bytes, name: str, members: set[str]) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            missing = members - set(zf.namelist())
    except zipfile.BadZipFile:
        raise InvalidDeployment(f"{name} is not a zip archive.") from None
    if missing:
        raise InvalidDeployment(f"{name} lacks {', '.join(sorted(missing))}.")


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
    _check_zip(client_zip, CLIENT_ZIP, CLIENT_MEMBERS)
    _check_zip(server_zip, SERVER_ZIP, SERVER_MEMBERS)
    versions = read_versions(server_zip, SERVER_ZIP)
    if read_versions(client_zip, CLIENT_ZIP) != versions:
        raise InvalidDeployment("client.zip and server.zip were saved by different versions.")
    return Deployment(client_zip=client_zip, server_zip=server_zip, versions=versions)
