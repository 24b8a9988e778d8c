"""The four tutorials that ``cipherpool demo`` runs: digits, health, image, sentiment.

Each is a model trained on data that a package ships (no downloads), the inputs an end user
sends it, and how to read the answer; :mod:`cipherpool.tutorials.runner` runs one through the
gateway and reports every step's time, what crossed the network, and FHE beside clear.
"""

from __future__ import annotations

from cipherpool.tutorials.base import Case, Reading, Trained, Tutorial
from cipherpool.tutorials.digits import Digits
from cipherpool.tutorials.health import Health
from cipherpool.tutorials.image import Sharpening
from cipherpool.tutorials.sentiment import Sentiment

TUTORIALS: dict[str, type[Tutorial]] = {t.name: t for t in (Digits, Health, Sharpening, Sentiment)}
DEFAULT = "digits"  # the quick one

__all__ = ["DEFAULT", "TUTORIALS", "Case", "Reading", "Trained", "Tutorial"]
