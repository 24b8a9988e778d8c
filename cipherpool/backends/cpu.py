"""The CPU: concrete's default target, and the fallback of the registry. A circuit saved without
a configuration asking for another backend (or as a shared library, without MLIR) runs here,
and every pool node runs it, whatever its host class."""

from __future__ import annotations

from decimal import Decimal

from cipherpool.backends.base import Backend, Rates


def always() -> bool:
    return True


BACKEND = Backend(
    name="cpu",
    host_class="cpu",
    target="the CPU",
    probe=always,
    compiled_for=None,  # the fallback
    rates=Rates(per_hour=Decimal("1"), standby_per_hour=Decimal("0.1"), execution_per_s=Decimal("0.001")),
)
