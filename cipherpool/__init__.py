"""cipherpool: encrypted (FHE) machine-learning queries served by a pool of Celery workers.

``from cipherpool import QueryClient, ManagementClient`` imports the clients when they are
asked for (PEP 562), not when any ``cipherpool.*`` module is: the CLI and the platform's
processes do not pay for them, nor the clients for each other's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cipherpool.errors import CipherpoolError
from cipherpool.version import __version__

if TYPE_CHECKING:
    from cipherpool.client import ManagementClient, QueryClient

__all__ = ["CipherpoolError", "ManagementClient", "QueryClient", "__version__"]
_CLIENTS = {"ManagementClient", "QueryClient"}


def __getattr__(name: str) -> object:
    if name in _CLIENTS:
        from cipherpool import client

        return getattr(client, name)
    raise AttributeError(f"module 'cipherpool' has no attribute {name!r}")
