"""Example models trained on data that scikit-learn ships (no downloads), compiled to FHE and
saved as deployment directories. Used by the demo, the tests and the benchmark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

SEED = 0


@dataclass
class Example:
    name: str
    path: Path
    x_test: NDArray[Any]
    y_test: NDArray[Any]
    clear: Callable[[NDArray[Any]], NDArray[Any]]  # the model's fhe="disable" output for a batch
    accuracy: float


def save_deployment(model: object, path: Path) -> None:
    """Save a compiled model as a deployment directory; FHEModelDev refuses a directory that
    already holds one, so a rerun replaces the old files."""
    from concrete.ml.deployment import FHEModelDev

    path.mkdir(parents=True, exist_ok=True)
    for leftover in ("client.zip", "server.zip"):
        (path / leftover).unlink(missing_ok=True)
    FHEModelDev(str(path), model).save()


def train_digits(path: Path) -> Example:
    """A 2-layer, 3-bit quantized MLP on the 8x8 digits (90 % test accuracy, 7-bit circuit)."""
    import torch
    from concrete.ml.sklearn import NeuralNetClassifier
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(SEED)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=SEED)
    model = NeuralNetClassifier(
        module__n_layers=2,
        module__n_w_bits=3,
        module__n_a_bits=3,
        module__n_accum_bits=10,
        module__n_hidden_neurons_multiplier=1,
        max_epochs=60,
        lr=0.005,
        verbose=0,
    )
    model.fit(x_train, y_train)
    model.compile(x_train[:200])
    save_deployment(model, path)
    accuracy = float((model.predict(x_test) == y_test).mean())
    return Example("digits", path, x_test, y_test, lambda xs: model.predict_proba(xs, fhe="disable"), accuracy)


def train_breast_cancer(path: Path) -> Example:
    """An 8-bit logistic regression on the breast-cancer data (no bootstrapping: tiny key)."""
    from concrete.ml.sklearn import LogisticRegression
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED)
    model = LogisticRegression(n_bits=8)
    model.fit(x_train, y_train)
    model.compile(x_train)
    save_deployment(model, path)
    accuracy = float((model.predict(x_test) == y_test).mean())
    return Example("breast-cancer", path, x_test, y_test, lambda xs: model.predict_proba(xs, fhe="disable"), accuracy)
