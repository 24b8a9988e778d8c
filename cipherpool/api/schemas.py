"""Request and response bodies of the gateway's HTTP API (``/v1``), as pydantic models.

The gateway declares them on its routes (so they are the OpenAPI page) and the Python clients
parse every answer with them, so the wire contract lives here and nowhere else. Keys,
ciphertexts and deployment zips are not JSON: they travel as ``application/octet-stream``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cipherpool.statuses import ModelStatus, WorkerStatus

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ID_PATTERN = r"^[0-9a-f]{16}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
KEY_ID_PATTERN = r"^[0-9a-f]{32}$"
QUERY_ID_PATTERN = r"^[0-9a-f-]{36}$"


class Wire(BaseModel):
    """Unknown fields are refused: a typo in a request is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(Wire):
    code: str
    message: str


class Health(Wire):
    status: str
    version: str


# ---- provider (API key) ----------------------------------------------------------------


class UploadOut(Wire):
    """A staged deployment artifact: referenced by a deploy within ``expires_in_s``."""

    upload_id: str = Field(pattern=SHA256_PATTERN)
    size_bytes: int
    expires_in_s: int


class DeployIn(Wire):
    name: str = Field(pattern=NAME_PATTERN)
    client_upload: str = Field(pattern=SHA256_PATTERN)
    server_upload: str = Field(pattern=SHA256_PATTERN)
    hardware: str = Field("cpu", pattern=r"^(cpu|gpu)$")


class ModelOut(Wire):
    id: str
    name: str
    status: ModelStatus
    hardware: str
    concrete_ml: str
    concrete_python: str
    created_at: str


class TokenIn(Wire):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    ttl_s: float | None = Field(None, gt=0, le=10 * 365 * 86400)


class TokenOut(Wire):
    id: str
    name: str
    model: str
    prefix: str
    created_at: str
    expires_at: str | None
    revoked: bool


class TokenCreated(TokenOut):
    token: str  # the clear value, shown once


class WorkerIn(Wire):
    model: str = Field(pattern=NAME_PATTERN)


class WorkerOut(Wire):
    id: str
    model: str | None
    node: str
    node_status: str | None
    status: WorkerStatus
    error: str | None
    created_at: str
    started_at: str | None
    stopped_at: str | None


class Figures(Wire):
    """Query counts and times over a span: one binding's, or a node's whole life."""

    since: float  # epoch seconds: when the span began (the model's load, or the node's start)
    queries_succeeded: int
    queries_refused: int  # typed refusals: bad input, wrong key, a query for another model
    queries_failed: int  # unexpected errors (the node's log has them)
    queries_requeued: int  # handed back to the model's queue after an unbind
    model_loads: int
    key_cache_hits: int
    key_cache_misses: int
    average_compute_s: float | None
    average_queue_wait_s: float | None
    last_compute_s: float | None


class KeyCacheOut(Wire):
    """The node's deserialized-key cache as it is now."""

    entries: int
    charged_bytes: int
    capacity_bytes: int
    evictions: int


class WorkerStats(Figures):
    """A running worker's live figures. The counts at the top level cover this worker (its
    binding to the node) only; ``node_lifetime`` covers everything the node process served."""

    worker_id: str | None
    model_id: str | None
    model: str | None
    node: str
    host_class: str
    concurrency: int
    threads: int | None
    bound_for_s: float | None
    node_lifetime: Figures
    key_cache: KeyCacheOut


# ---- end user (access token) -----------------------------------------------------------


class ClientModelOut(Wire):
    """What a QueryClient needs: the model's identity and versions, and whether it is served."""

    id: str
    name: str
    status: ModelStatus
    concrete_ml: str
    concrete_python: str
    client_zip_sha256: str
    running_workers: int


class KeyOut(Wire):
    key_id: str
    blob_id: str
    size_bytes: int


class QueryAccepted(Wire):
    """A query is queued (HTTP 202); wait on ``GET /v1/queries/{id}``."""

    id: str
    status: str  # queued | started
