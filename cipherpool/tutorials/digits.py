"""Digit recognition: the quick one. A 2-layer, 3-bit MLP on scikit-learn's 8x8 digits; the
end user encrypts a handwritten digit and reads back the ten class probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cipherpool.tutorials.base import Case, Reading, Trained, Tutorial

CASES = 4


class Digits(Tutorial):
    name = "digits"
    title = "digit recognition: which digit is this 8x8 image?"
    model = "2-layer MLP, 3-bit weights and activations (scikit-learn digits)"

    def train(self, path: Path) -> Trained:
        from cipherpool.examples import train_digits

        self.example = train_digits(path)
        return Trained(
            path,
            self.example.clear,
            f"clear test accuracy {self.example.accuracy:.1%}",
            {"accuracy": self.example.accuracy, "features": 64},
        )

    def cases(self) -> list[Case]:
        return [Case(f"test image {i}", self.example.x_test[i], str(int(self.example.y_test[i]))) for i in range(CASES)]

    def read(self, case: Case, decrypted: NDArray[Any], clear: NDArray[Any]) -> Reading:
        fhe_digit, clear_digit = int(decrypted.argmax()), int(clear.argmax())
        difference = float(np.abs(decrypted - clear).max())
        return Reading(
            f"digit {fhe_digit}",
            f"digit {clear_digit}",
            fhe_digit == clear_digit and difference <= 1e-3,
            {
                "fhe": fhe_digit,
                "clear": clear_digit,
                "max_probability_difference": difference,
                "fhe_probabilities": [round(float(p), 6) for p in decrypted.ravel()],
            },
        )
