"""The embedded stack: Redis, control worker, pool nodes, beat and Flower as child processes.

``EmbeddedStack`` is imported when it is asked for (PEP 562): a supervised child's launcher
(:mod:`cipherpool.stack.child`) and the supervisor do not pay for the stack's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cipherpool.stack.embedded import EmbeddedStack

__all__ = ["EmbeddedStack"]


def __getattr__(name: str) -> Any:
    if name == "EmbeddedStack":
        from cipherpool.stack.embedded import EmbeddedStack

        return EmbeddedStack
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
