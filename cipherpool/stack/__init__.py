"""The embedded stack: Redis, control worker, pool nodes, beat and Flower as child processes."""

from cipherpool.stack.embedded import EmbeddedStack

__all__ = ["EmbeddedStack"]
