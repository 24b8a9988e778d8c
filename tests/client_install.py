"""A client install, simulated in this venv: ``import tests.client_install`` (first thing, in a
fresh process) makes every package that only the ``server`` extra brings unimportable, as in
``pip install cipherpool`` without ``[server]``.

Which packages those are is read from pyproject.toml and the installed distributions, not
listed by hand: the dependency closure of ``[project] dependencies`` is what the base install
has; what the ``server`` extra adds beyond it (celery, kombu, redis, fastapi, sqlalchemy, ...
and what they pull in) is blocked by its top-level module names. A real client venv would cost
the suite the 6 GB of concrete-ml again; this checks the same thing: that nothing the client
runs imports what such a venv would lack.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import tomllib
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(requirements: Iterable[str]) -> set[str]:
    """The installed distributions that ``requirements`` need, themselves included (markers
    evaluated, extras followed)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (_norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            needs = requires(req.name) or []
        except PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        for text in needs:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                stack.append(Requirement(str(sub).split(";")[0]))
    return {name for name, _ in seen}


def server_only_modules() -> set[str]:
    """Top-level module names of the distributions that the ``server`` extra adds to the base."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    base = closure(project["dependencies"])
    server = closure(project["dependencies"] + project["optional-dependencies"]["server"]) - base
    return {module for module, dists in packages_distributions().items() if {_norm(d) for d in dists} <= server}


class _Blocked(importlib.abc.MetaPathFinder):
    def __init__(self, modules: set[str]):
        self.modules = modules

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.modules:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not in a client install)", name=fullname)
        return None


BLOCKED = server_only_modules()
if loaded := sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED):
    raise RuntimeError(f"import tests.client_install first: already loaded {loaded[:5]}")
sys.meta_path.insert(0, _Blocked(BLOCKED))
