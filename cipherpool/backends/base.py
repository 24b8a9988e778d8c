"""What an execution backend is: a target a circuit can be compiled for, and what a pool node
needs to run circuits compiled for it.

A backend is a description, importable by every layer (the wire types and the tables take their
defaults from it): it imports no other cipherpool module. What needs the FHE library, the
evaluator factory, is named as ``module:attribute`` and imported only on the node that loads a
model, as ``payment_provider`` and ``node_hooks`` are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")  # backends and host classes: stored, in queue names and JSON
CONCRETE_EVALUATOR = "cipherpool.fhe.evaluator:ConcreteEvaluator"  # concrete-ml's FHEModelServer

Configuration = Mapping[str, Any]  # concrete's Configuration, as a server.zip saved via MLIR holds it


@dataclass(frozen=True)
class Rates:
    """A host class's default prices in credits, which the settings override: per hour of a
    worker up, per hour on standby, per second of computation on a shared node."""

    per_hour: Decimal
    standby_per_hour: Decimal
    execution_per_s: Decimal


@dataclass(frozen=True)
class Backend:
    """One execution backend.

    * ``name``: what a model version records it was compiled for (``ModelVersion.backend``)
      and what a node reports among its ``capabilities`` when its probe passes.
    * ``host_class``: the class of pool node it runs on (profiles' ``host_class``, a model's
      ``hardware``, the routing key of its queries). The fallback backend runs on every class.
    * ``probe``: run on a node of its host class when it registers (it may import the FHE
      library: only such nodes ask); True when this process can run circuits compiled for it.
    * ``compiled_for``: whether concrete's configuration of a server.zip asks for this backend.
      None for the fallback: what a circuit asking for no other backend runs on (exactly one).
    * ``evaluator``: ``module:attribute`` of a callable ``(server_zip, workdir) -> Evaluator``.
    * ``target``, ``needs``, ``absent``, ``remedy``: how messages name it, what a node needs to
      run it, what a node that cannot run it lacks (said by that node), and how an operator
      gives a node what it needs.
    * ``rates``: the default prices of its host class, set by the backend that introduces it.
    """

    name: str
    host_class: str
    target: str
    probe: Callable[[], bool]
    compiled_for: Callable[[Configuration], bool] | None = None
    evaluator: str = CONCRETE_EVALUATOR
    needs: str = ""
    absent: str = ""
    remedy: str = ""
    rates: Rates | None = None

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("host_class", self.host_class)):
            if not NAME.fullmatch(value):
                raise ValueError(f"backend {what} {value!r} must match {NAME.pattern}")
