"""The registry of execution backends: the one place that knows which backends and host
classes exist.

A backend (:class:`Backend`) is a target a circuit is compiled for: its name, the host class of
the nodes it runs on, a capability probe a node runs when it registers, what in a server.zip
says a circuit was compiled for it, and the factory of its evaluator. Everything else asks here:
a model's ``hardware`` and a profile's ``host_class`` must be one of :func:`host_classes`; a
version records :func:`compiled_for` its configuration (``fhe.deployment.compiled_backend``);
a node reports the backends whose probe passed (:func:`probe`) as its ``capabilities``, and is
offered a model only if it has every backend the model's versions were compiled for; it loads
each version with the evaluator of its backend (``fhe.evaluator.load_evaluator``).

Adding a backend
----------------
1. A module here, ``cipherpool/backends/<name>.py``, defining ``BACKEND = Backend(...)``: a
   name and host class (a new class, with its default ``rates``, or an existing one), a
   ``probe`` (import the FHE library inside it: only nodes of its class ask), ``compiled_for``
   (a predicate on concrete's configuration) and ``evaluator`` (``module:attribute`` of a
   ``(server_zip, workdir) -> Evaluator``; concrete's evaluator serves any target concrete
   compiles for), plus the words messages use (``target``, ``needs``, ``remedy``).
2. Its line in :data:`BUILTIN` below (order decides between two backends that both claim a
   configuration: the first wins).
3. Its tests (``tests/test_backends.py`` shows the shape). No migration: versions store the
   backend's name and nodes their capabilities as text; queues, profiles, the CLI's choices and
   the API's patterns read the names from here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from cipherpool.backends import cpu, gpu
from cipherpool.backends.base import NAME, Backend, Configuration, Rates

__all__ = [
    "BUILTIN",
    "DEFAULT_BACKEND",
    "DEFAULT_HOST_CLASS",
    "NAME",
    "Backend",
    "Configuration",
    "Rates",
    "compiled_for",
    "default_rates",
    "describe",
    "evaluator_factory",
    "fallback",
    "for_host_class",
    "get",
    "host_class",
    "host_class_pattern",
    "host_classes",
    "names",
    "probe",
    "register",
    "runs_on",
    "unregister",
]

BUILTIN: tuple[Backend, ...] = (cpu.BACKEND, gpu.BACKEND)

_backends: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend``; ValueError for a name taken, a second fallback, or a second set of
    default rates for one host class."""
    if backend.name in _backends:
        raise ValueError(f"a backend named {backend.name!r} is registered already")
    if backend.compiled_for is None and any(b.compiled_for is None for b in _backends.values()):
        raise ValueError(f"backend {backend.name!r}: there is a fallback already (compiled_for=None); give a predicate")
    if backend.rates is not None and any(b.host_class == backend.host_class and b.rates for b in _backends.values()):
        raise ValueError(f"backend {backend.name!r}: host class {backend.host_class!r} has its default rates already")
    _backends[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend (tests that register one of their own)."""
    if _backends.get(name) in BUILTIN:
        raise ValueError(f"backend {name!r} is built in")
    _backends.pop(name, None)


def get(name: str) -> Backend:
    try:
        return _backends[name]
    except KeyError:
        raise ValueError(f"no backend named {name!r}; known: {', '.join(_backends)}") from None


def describe(name: str) -> Backend:
    """The backend ``name`` for messages: registered, or (a version compiled for a backend no
    longer registered) a stand-in that no node runs."""
    if name in _backends:
        return _backends[name]
    return Backend(
        name=name,
        host_class=name,
        target=f"the {name} backend",
        probe=never,
        compiled_for=lambda _: False,
        evaluator="",
        needs=f"the {name} backend",
        remedy="deploy a version compiled for a registered backend",
    )


def never() -> bool:
    return False


def names() -> tuple[str, ...]:
    return tuple(_backends)


def fallback() -> Backend:
    """What a circuit compiled for no other backend runs on; every host class runs it."""
    return next(b for b in _backends.values() if b.compiled_for is None)


def host_classes() -> tuple[str, ...]:
    """Every host class, in the order their backends were registered."""
    return tuple(dict.fromkeys(b.host_class for b in _backends.values()))


def host_class(value: str) -> str:
    """``value`` as the registry spells it (the same object, so ``is`` holds); ValueError
    worded as pydantic words a choice."""
    for known in host_classes():
        if known == value:
            return known
    *first, last = [repr(name) for name in host_classes()]
    raise ValueError(f"Input should be {', '.join(first) + ' or ' if first else ''}{last}")


def host_class_pattern() -> str:
    """A regular expression matching exactly the host classes (for the API's fields)."""
    return "^(" + "|".join(host_classes()) + ")$"


def for_host_class(name: str) -> tuple[Backend, ...]:
    """The backends a node of host class ``name`` may run: the fallback, and those of its class."""
    return tuple(b for b in _backends.values() if b.compiled_for is None or b.host_class == name)


def runs_on(backend: str, host_class: str) -> bool:
    """Whether a circuit compiled for ``backend`` may run on a node of ``host_class``."""
    return backend in _backends and get(backend) in for_host_class(host_class)


def probe(host_class: str) -> tuple[str, ...]:
    """The capabilities of this process as a node of ``host_class``: the backends of the class
    whose probe passes (probes of other classes are not run: they may import the FHE library)."""
    return tuple(b.name for b in for_host_class(host_class) if b.probe())


def compiled_for(configuration: Configuration) -> str:
    """The backend a circuit with concrete's ``configuration`` was compiled for."""
    for backend in _backends.values():
        if backend.compiled_for is not None and backend.compiled_for(configuration):
            return backend.name
    return fallback().name


@functools.cache
def evaluator_factory(name: str) -> Callable[[bytes, Path], Any]:
    """The evaluator factory of backend ``name``, imported on first use (on the node that loads
    a model: it may import the FHE library)."""
    path = get(name).evaluator
    module, _, attribute = path.partition(":")
    factory = getattr(importlib.import_module(module), attribute)
    if not callable(factory):
        raise TypeError(f"backend {name!r}: {path} is not callable")
    return factory  # type: ignore[no-any-return]


def default_rates(field: str) -> dict[str, Decimal]:
    """One field of :class:`Rates` by host class, from the backends that set their class's."""
    return {b.host_class: getattr(b.rates, field) for b in _backends.values() if b.rates is not None}


for _builtin in BUILTIN:
    register(_builtin)

DEFAULT_BACKEND: str = fallback().name  # a version's backend, a node's capability, where nothing says otherwise
DEFAULT_HOST_CLASS: str = fallback().host_class  # a model's hardware and a node's class, where nothing says otherwise
