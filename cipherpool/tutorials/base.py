"""What a tutorial is: a model trained on data that a package ships, the inputs an end user
sends it, and how to read a decrypted answer beside the model's clear one.

A tutorial knows nothing of the platform: :mod:`cipherpool.tutorials.runner` deploys it and
queries it through the gateway like any user, so the same tutorial serves ``cipherpool demo``
(embedded stack) and tests, and its ``train`` serves the scripts in ``examples/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from numpy.typing import NDArray


@dataclass
class Trained:
    """A model compiled to FHE and saved as a deployment directory (``FHEModelDev``)."""

    path: Path
    clear: Callable[[NDArray[Any]], NDArray[Any]]  # the model's output in the clear (fhe="disable") for a batch
    summary: str  # one line for people: what was trained and how good it is
    facts: dict[str, Any] = field(default_factory=dict)  # the same for machines


@dataclass
class Case:
    """One input the end user sends: ``x`` is one sample as the model takes it (no batch axis)."""

    label: str
    x: NDArray[Any]
    truth: str | None = None


@dataclass
class Reading:
    """One case's answer, decrypted FHE beside clear. ``agree`` is the tutorial's own test of
    agreement (same class, same probability within 1e-3, same pixels)."""

    fhe: str
    clear: str
    agree: bool
    values: dict[str, Any] = field(default_factory=dict)


class Tutorial(ABC):
    name: ClassVar[str]
    title: ClassVar[str]  # what the model does, in a line
    model: ClassVar[str]  # the model, in a few words
    writes_files: ClassVar[bool] = False  # finish() writes files under the demo's --out

    @abstractmethod
    def train(self, path: Path) -> Trained:
        """Train on packaged data, compile to FHE and save the deployment in ``path``."""

    @abstractmethod
    def cases(self) -> list[Case]:
        """The inputs this tutorial queries (valid after ``train``)."""

    @abstractmethod
    def read(self, case: Case, decrypted: NDArray[Any], clear: NDArray[Any]) -> Reading:
        """Interpret the decrypted output and the clear one for people, and compare them."""

    def finish(self, cases: list[Case], decrypted: list[NDArray[Any]], out_dir: Path | None) -> dict[str, str]:
        """Write what the tutorial produces beyond its printed answers (files); their paths by role."""
        return {}
