"""Clients: need only a broker URL and a credential, never database access."""

from cipherpool.client.management import ManagementClient, WorkerInfo
from cipherpool.client.query import QueryClient, QueryHandle

__all__ = ["ManagementClient", "QueryClient", "QueryHandle", "WorkerInfo"]
