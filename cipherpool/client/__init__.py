"""Clients: need only the gateway's URL and a credential; no broker, no database."""

from cipherpool.client.management import ManagementClient, WorkerInfo
from cipherpool.client.query import QueryClient, QueryHandle

__all__ = ["ManagementClient", "QueryClient", "QueryHandle", "WorkerInfo"]
