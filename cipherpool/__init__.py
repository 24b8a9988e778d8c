"""cipherpool: encrypted (FHE) machine-learning queries served by a pool of Celery workers."""

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.errors import CipherpoolError

__version__ = "0.8.0"
__all__ = ["CipherpoolError", "ManagementClient", "QueryClient", "__version__"]
