"""SQLModel tables: the durable state of the platform.

Secrets are never stored: accounts keep the SHA-256 of their API key and tokens of their
value (both are 256-bit random strings, so a fast hash is enough; a slow password hash buys
nothing against an attacker who cannot guess 2^256 values). Ids are random hex, so ids in
queue names and URLs reveal nothing about other tenants.
"""

from __future__ import annotations

import uuid
from datetime import datetime, UTC

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from cipherpool.statuses import ModelStatus, NodeStatus, WorkerStatus

__all__ = ["ModelStatus", "NodeStatus", "WorkerStatus"]


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Account(SQLModel, table=True):
    __tablename__ = "accounts"
    id: str = Field(default_factory=new_id, primary_key=True)
    name: str = Field(index=True, unique=True)
    api_key_hash: str = Field(index=True, unique=True)
    api_key_prefix: str
    created_at: datetime = Field(default_factory=utcnow)


class Model(SQLModel, table=True):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("account_id", "name"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    name: str
    status: ModelStatus = ModelStatus.DEPLOYED
    hardware: str = "cpu"
    client_blob: str  # sha256 of client.zip in the blob store
    server_blob: str  # sha256 of server.zip in the blob store
    concrete_ml_version: str
    concrete_python_version: str
    python_version: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AccessToken(SQLModel, table=True):
    __tablename__ = "access_tokens"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    name: str
    token_hash: str = Field(index=True, unique=True)
    prefix: str  # first characters, so a user can tell tokens apart in listings
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class EvaluationKey(SQLModel, table=True):
    """A client key set registered under one token: its random id (what queries and
    ciphertexts name) and the content-addressed blob of its evaluation key.

    Both are needed: models without bootstrapping have one and the same 64-byte evaluation
    key for every client, so the blob's hash cannot tell two clients apart."""

    __tablename__ = "evaluation_keys"
    __table_args__ = (UniqueConstraint("token_id", "key_id"),)
    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(index=True)  # random id minted by the client with its key set
    blob_id: str  # sha256 of the serialized evaluation key in the blob store
    token_id: str = Field(foreign_key="access_tokens.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    size_bytes: int
    created_at: datetime = Field(default_factory=utcnow)


class PoolNode(SQLModel, table=True):
    __tablename__ = "pool_nodes"
    name: str = Field(primary_key=True)  # the Celery node name, e.g. node1@host
    host_class: str = "cpu"
    concurrency: int = 1
    threads: int | None = None
    status: NodeStatus = NodeStatus.ONLINE
    worker_id: str | None = None  # the binding that holds this node; claimed atomically
    pid: int | None = None
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)


class Worker(SQLModel, table=True):
    """A model bound to a pool node: what `start_worker` creates and `stop_worker` ends."""

    __tablename__ = "workers"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model_id: str = Field(foreign_key="models.id", index=True)
    node_name: str = Field(foreign_key="pool_nodes.name", index=True)
    status: WorkerStatus = WorkerStatus.STARTING
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    stopped_at: datetime | None = None
