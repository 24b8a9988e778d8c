"""Health analysis: is a breast tumour malignant? Gradient-boosted trees (XGBoost) on the
Wisconsin breast-cancer table that scikit-learn ships; the end user encrypts a patient's 30
measurements and reads back the probability of malignancy, computed without the platform
seeing a single measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from cipherpool.examples import save_deployment
from cipherpool.tutorials.base import Case, Reading, Trained, Tutorial

SEED = 0
PATIENTS = 3
TREES, DEPTH, BITS = 10, 3, 6
TOLERANCE = 1e-3  # probabilities: FHE and clear agree within this


def train_health(path: Path) -> tuple[Any, NDArray[Any], NDArray[Any], float]:
    """XGBoost (10 trees of depth 3, 6-bit inputs) on breast cancer; returns (model, x_test,
    y_test, clear test accuracy). In scikit-learn's target, 0 is malignant and 1 benign."""
    from concrete.ml.sklearn import XGBClassifier
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    model = XGBClassifier(n_bits=BITS, n_estimators=TREES, max_depth=DEPTH, random_state=SEED)
    model.fit(x_train, y_train)
    model.compile(x_train)
    save_deployment(model, path)
    return model, x_test, y_test, float((model.predict(x_test) == y_test).mean())


class Health(Tutorial):
    name = "health"
    title = "health analysis: the probability that a breast tumour is malignant"
    model = f"XGBoost, {TREES} trees of depth {DEPTH}, {BITS}-bit inputs (scikit-learn breast cancer)"

    def train(self, path: Path) -> Trained:
        self.fitted, self.x_test, self.y_test, accuracy = train_health(path)
        return Trained(
            path,
            lambda xs: self.fitted.predict_proba(xs, fhe="disable"),
            f"clear test accuracy {accuracy:.1%} on {len(self.y_test)} held-out patients",
            {"accuracy": accuracy, "features": int(self.x_test.shape[1]), "trees": TREES, "depth": DEPTH},
        )

    def cases(self) -> list[Case]:
        # Both diagnoses among the patients shown: the first malignant, then benign ones.
        malignant = [i for i in range(len(self.y_test)) if self.y_test[i] == 0][:1]
        benign = [i for i in range(len(self.y_test)) if self.y_test[i] == 1][: PATIENTS - len(malignant)]
        return [
            Case(f"patient {i}", self.x_test[i], "malignant" if self.y_test[i] == 0 else "benign")
            for i in sorted(malignant + benign)
        ]

    def read(self, case: Case, decrypted: NDArray[Any], clear: NDArray[Any]) -> Reading:
        fhe_p, clear_p = float(decrypted.ravel()[0]), float(clear.ravel()[0])  # class 0: malignant

        def verdict(p: float) -> str:
            return f"P(malignant) {p:.3f} ({'malignant' if p >= 0.5 else 'benign'})"

        agree = abs(fhe_p - clear_p) <= TOLERANCE and (fhe_p >= 0.5) == (clear_p >= 0.5)
        return Reading(
            verdict(fhe_p),
            verdict(clear_p),
            agree,
            {"fhe_p_malignant": fhe_p, "clear_p_malignant": clear_p, "difference": abs(fhe_p - clear_p)},
        )
