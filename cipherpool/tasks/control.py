"""Management tasks on the control queue: decode -> authorise -> service -> envelope.

Account tasks authenticate with the account's API key; ``client.*`` tasks with an access
token (what an end user's QueryClient holds). Neither ever returns another tenant's rows.
"""

from __future__ import annotations

from cipherpool.db.tables import Model, ModelStatus, WorkerStatus
from cipherpool.errors import EvaluationKeyNotFound, InvalidDeployment, InvalidEvaluationKey
from cipherpool.fhe.deployment import SERVER_ZIP, read_versions
from cipherpool.fhe.framing import capnp_message_length, header_bytes_needed
from cipherpool.names import TASK_PREFIX, node_queue
from cipherpool.services import models, queries, tokens
from cipherpool.services import workers as worker_service
from cipherpool.services.accounts import authenticate
from cipherpool.store import BlobKind
from cipherpool.tasks.app import app
from cipherpool.tasks.envelope import platform_task
from cipherpool.workers.context import platform

P = TASK_PREFIX + "control."


@platform_task(app, P + "deploy_model")
def deploy_model(api_key: str, name: str, client_blob: str, server_blob: str, hardware: str = "cpu") -> dict:
    ctx = platform()
    for kind, blob in ((BlobKind.CLIENT_ZIP, client_blob), (BlobKind.SERVER_ZIP, server_blob)):
        if not ctx.store.exists(kind, blob):
            raise InvalidDeployment(f"The {kind.value}.zip was not uploaded; deploy again.")
    versions = read_versions(ctx.store.get(BlobKind.SERVER_ZIP, server_blob), SERVER_ZIP)
    with ctx.session() as session:
        account = authenticate(session, api_key)
        model = models.deploy_model(
            session, account, name, client_blob=client_blob, server_blob=server_blob,
            versions=versions, hardware=hardware,
        )
        return models.describe(model)


@platform_task(app, P + "list_models")
def list_models(api_key: str) -> list[dict]:
    with platform().session() as session:
        return [models.describe(m) for m in models.list_models(session, authenticate(session, api_key))]


@platform_task(app, P + "set_model_status")
def set_model_status(api_key: str, name: str, status: str) -> dict:
    with platform().session() as session:
        account = authenticate(session, api_key)
        return models.describe(models.set_status(session, account, name, ModelStatus(status)))


@platform_task(app, P + "create_token")
def create_token(api_key: str, name: str, model: str, ttl_s: float | None = None) -> dict:
    with platform().session() as session:
        token, value = tokens.create_token(session, authenticate(session, api_key), name, model, ttl_s)
        return {**tokens.describe(token, model), "token": value}


@platform_task(app, P + "revoke_token")
def revoke_token(api_key: str, token_id: str) -> dict:
    with platform().session() as session:
        token = tokens.revoke_token(session, authenticate(session, api_key), token_id)
        return tokens.describe(token, _model_name(session, token.model_id))


@platform_task(app, P + "list_tokens")
def list_tokens(api_key: str) -> list[dict]:
    with platform().session() as session:
        account = authenticate(session, api_key)
        return [tokens.describe(t, _model_name(session, t.model_id)) for t in tokens.list_tokens(session, account)]


@platform_task(app, P + "start_worker")
def start_worker(api_key: str, model: str) -> dict:
    ctx = platform()
    with ctx.session() as session:
        worker = worker_service.start_worker(
            session, authenticate(session, api_key), model, ctx.settings.node_heartbeat_s
        )
        described = worker_service.describe(session, worker)
    app.send_task(TASK_PREFIX + "node.bind", kwargs={"worker_id": worker.id}, queue=node_queue(worker.node_name))
    return described


@platform_task(app, P + "stop_worker")
def stop_worker(api_key: str, worker_id: str) -> dict:
    """Unbind on the node; a node that is offline or silent is released here at once (it
    finds the binding stopped when it comes back)."""
    ctx = platform()
    with ctx.session() as session:
        worker = worker_service.request_stop(session, authenticate(session, api_key), worker_id)
        node_gone = not worker_service.node_is_live(session, worker.node_name, ctx.settings.node_heartbeat_s)
        if worker.status == WorkerStatus.STOPPING and node_gone:
            worker_service.finish(session, worker.id, WorkerStatus.STOPPED)
        described = worker_service.describe(session, worker)
    if worker.status == WorkerStatus.STOPPING and not node_gone:
        app.send_task(TASK_PREFIX + "node.unbind", kwargs={"worker_id": worker.id}, queue=node_queue(worker.node_name))
    return described


@platform_task(app, P + "get_worker")
def get_worker(api_key: str, worker_id: str) -> dict:
    with platform().session() as session:
        return worker_service.describe(session, worker_service.get_worker(session, authenticate(session, api_key), worker_id))


@platform_task(app, P + "list_workers")
def list_workers(api_key: str, model: str | None = None) -> list[dict]:
    with platform().session() as session:
        account = authenticate(session, api_key)
        return [worker_service.describe(session, w) for w in worker_service.list_workers(session, account, model)]


@platform_task(app, TASK_PREFIX + "client.describe")
def describe_for_client(token: str) -> dict:
    """What a QueryClient needs: the model's id, status, versions and client specs blob."""
    with platform().session() as session:
        _, model = tokens.resolve_token(session, token)
        return {
            **models.describe(model),
            "client_blob": model.client_blob,
            "running_workers": worker_service.running_count(session, model.id),
        }


@platform_task(app, TASK_PREFIX + "client.register_key")
def register_key(token: str, key_id: str, blob_id: str) -> dict:
    """Let this token's client key set use an evaluation key it has put in the store.

    Only the segment table is read (a few bytes, not tens of MB) to refuse a truncated key
    here: concrete's reader never returns on one."""
    ctx = platform()
    if not ctx.store.exists(BlobKind.EVALUATION_KEY, blob_id):
        raise EvaluationKeyNotFound("The evaluation key was not found in the store; upload it again.")
    size = ctx.store.size(BlobKind.EVALUATION_KEY, blob_id)
    head = ctx.store.head(BlobKind.EVALUATION_KEY, blob_id, 8)
    head = ctx.store.head(BlobKind.EVALUATION_KEY, blob_id, header_bytes_needed(head))
    if capnp_message_length(head) != size:
        raise InvalidEvaluationKey("The uploaded evaluation key is truncated or corrupt; upload it again.")
    with ctx.session() as session:
        token_row, _ = tokens.resolve_token(session, token)
        queries.register_key(session, token_row, key_id, blob_id, size)
    return {"key_id": key_id, "blob_id": blob_id, "size_bytes": size}


def _model_name(session, model_id: str) -> str:
    model = session.get(Model, model_id)
    return model.name if model else "?"
