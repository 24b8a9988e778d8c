"""cipherpool: encrypted (FHE) machine-learning queries served by a pool of Celery workers."""

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.errors import CipherpoolError
from cipherpool.version import __version__

__all__ = ["CipherpoolError", "ManagementClient", "QueryClient", "__version__"]
