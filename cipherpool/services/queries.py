"""Authorisation of a query and the evaluation keys it may use.

Checked once, before a query is published: by the gateway (with the grant cached for a few
seconds) or by trusted in-cluster code (:mod:`cipherpool.tasks.submit`). Pool nodes trust
what reaches their queue (the broker is private to the platform) and never touch the
database on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum

from sqlmodel import Session, col, func, select

from cipherpool import backends
from cipherpool.clock import aware, utcnow
from cipherpool.db.tables import (
    AccessToken,
    Account,
    EvaluationKey,
    Model,
    ModelStatus,
    ModelVersion,
    NodeStatus,
    PoolNode,
    TokenModel,
    Worker,
    WorkerStatus,
)
from cipherpool.errors import (
    EvaluationKeyExpired,
    EvaluationKeyNotFound,
    InsufficientCredits,
    InvalidEvaluationKey,
    InvalidInput,
    InvalidToken,
    KeysOutdated,
    ModelInactive,
    NoWorkerUp,
    TokenExpired,
    TokenNotForModel,
    TooManyKeys,
)
from cipherpool.services import blobs, keysets
from cipherpool.services.keysets import KeyQuotas
from cipherpool.services.nodes import can_run
from cipherpool.services.tokens import check_usable, resolve_token, resolve_token_hash
from cipherpool.store import BlobKind

KEY_ID = re.compile(r"[0-9a-f]{32}")
REGENERATE = (
    "generate keys again from its current client specs and upload them "
    "(QueryClient: refresh(), then generate_keys() and upload_evaluation_keys(); "
    "CLI: `cipherpool query keygen` then `cipherpool query upload-keys`)"
)


@dataclass(frozen=True)
class ModelGrant:
    """One model a token may query, as it is now: its status, serving version and the digest
    of that version's client specs (keys made from other specs are outdated)."""

    model_id: str
    name: str
    status: ModelStatus
    version: int
    client_blob: str
    hardware: str = backends.DEFAULT_HOST_CLASS  # its host class: the routing key of its queries
    dedicated: bool = True  # a dedicated worker is up for it
    shared_online: bool = False  # a shared node of its class is online
    allows_shared: bool = False  # its provider lets it run on shared nodes
    # The online nodes with a worker of it up, and their execution slots (key affinity routes
    # among them: cipherpool.affinity); sorted by name.
    nodes: tuple[tuple[str, int], ...] = ()

    @property
    def shared(self) -> bool:
        """A shared node may serve it now."""
        return self.allows_shared and self.shared_online

    @property
    def serving(self) -> bool:
        return self.dedicated or self.shared


class Route(str, Enum):
    """Where a query goes. The caller picks ``auto`` (dedicated when a worker is up, else a
    shared node), ``dedicated`` or ``shared``."""

    AUTO = "auto"
    DEDICATED = "dedicated"
    SHARED = "shared"


@dataclass(frozen=True)
class TokenGrant:
    """What a live token may do: query the models it is assigned to, up to its quota. Small
    and immutable, so the gateway can cache it for a few seconds."""

    token_id: str
    account_id: str
    quota: int | None
    models: tuple[ModelGrant, ...]
    expires_at: datetime | None = None
    in_credit: bool = True  # its account's balance is above zero (shared-node queries are charged per execution)

    def find(self, model_id: str) -> ModelGrant | None:
        return next((m for m in self.models if m.model_id == model_id), None)

    def check_unexpired(self, now: datetime | None = None) -> None:
        """A cached grant outlives nothing: a token that expired while cached is refused."""
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            raise TokenExpired("This access token has expired; ask the model's provider to extend it or for a new one.")


@dataclass(frozen=True)
class KeyRef:
    """A registered key set: its evaluation-key blob, model, the client specs it came from,
    the newest model version with those specs (None: none has them any more) and whether it
    expired (:mod:`cipherpool.services.keysets`)."""

    blob_id: str
    model_id: str
    client_blob: str
    version: int | None = None
    expired: bool = False


def _grant(session: Session, token: AccessToken) -> TokenGrant:
    rows = session.exec(
        select(Model, ModelVersion)
        .join(TokenModel, TokenModel.model_id == Model.id)  # type: ignore[arg-type]
        .join(ModelVersion, (ModelVersion.model_id == Model.id) & (ModelVersion.number == Model.version))  # type: ignore[arg-type]
        .where(TokenModel.token_id == token.id)
        .order_by(Model.name)
    ).all()
    dedicated, shared = serving_models(session, [m.id for m, _ in rows])
    models = tuple(
        ModelGrant(
            m.id,
            m.name,
            m.status,
            m.version,
            v.client_blob,
            m.hardware,
            m.id in dedicated,
            m.id in shared,
            m.shared,
            dedicated.get(m.id, ()),
        )
        for m, v in rows
    )
    account = session.get(Account, token.account_id)
    return TokenGrant(
        token.id,
        token.account_id,
        token.quota,
        models,
        aware(token.expires_at) if token.expires_at is not None else None,
        in_credit=account is not None and account.balance_micro > 0,
    )


@dataclass(frozen=True)
class ServingState:
    """What changes in a grant as workers start, stop and load versions, without any
    credential changing: the serving version (and its client specs) of each model, which
    have a worker up or a shared node, and whether the account is in credit. Gateways cache
    it apart from credentials (:meth:`cipherpool.gateway.auth.Authenticator.with_serving`)."""

    versions: dict[str, tuple[int, str]]  # model id -> (serving version, its client.zip digest)
    dedicated: frozenset[str]
    shared: frozenset[str]
    in_credit: bool
    nodes: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # model id -> its up nodes and slots

    @classmethod
    def of(cls, grant: TokenGrant) -> ServingState:
        """The state a grant was loaded with."""
        return cls(
            {m.model_id: (m.version, m.client_blob) for m in grant.models},
            frozenset(m.model_id for m in grant.models if m.dedicated),
            frozenset(m.model_id for m in grant.models if m.shared_online),
            grant.in_credit,
            {m.model_id: m.nodes for m in grant.models},
        )

    def apply(self, grant: TokenGrant) -> TokenGrant:
        models = []
        for m in grant.models:
            version, client_blob = self.versions.get(m.model_id, (m.version, m.client_blob))
            models.append(
                replace(
                    m,
                    version=version,
                    client_blob=client_blob,
                    dedicated=m.model_id in self.dedicated,
                    shared_online=m.model_id in self.shared,
                    nodes=self.nodes.get(m.model_id, ()),
                )
            )
        return replace(grant, models=tuple(models), in_credit=self.in_credit)


def serving_state(session: Session, account_id: str, model_ids: list[str]) -> ServingState:
    rows = session.exec(
        select(Model.id, Model.version, ModelVersion.client_blob)
        .join(ModelVersion, (col(ModelVersion.model_id) == Model.id) & (col(ModelVersion.number) == Model.version))
        .where(col(Model.id).in_(model_ids))
    ).all()
    dedicated, shared = serving_models(session, model_ids)
    account = session.get(Account, account_id)
    return ServingState(
        {model_id: (version, blob) for model_id, version, blob in rows},
        frozenset(dedicated),
        frozenset(shared),
        account is not None and account.balance_micro > 0,
        dict(dedicated),
    )


def grant_for_value(session: Session, value: str | None) -> TokenGrant:
    """The grant behind a clear token value (what the gateway receives as a bearer)."""
    return _grant(session, resolve_token(session, value))


def grant_for_hash(session: Session, token_hash: str) -> TokenGrant:
    """:func:`grant_for_value` by the value's digest (the gateway's cache reloads by it)."""
    return _grant(session, resolve_token_hash(session, token_hash))


def grant_for_id(session: Session, token_id: str) -> TokenGrant:
    """The grant of a token named by id (what trusted in-cluster code holds)."""
    token = session.get(AccessToken, token_id) if isinstance(token_id, str) else None
    if token is None:
        raise InvalidToken(f"No access token with id {str(token_id)[:32]!r}.")
    check_usable(session, token)
    return _grant(session, token)


def serving_models(session: Session, model_ids: list[str]) -> tuple[dict[str, tuple[tuple[str, int], ...]], set[str]]:
    """Which of these models have a worker up on an online node (and on which nodes, with
    their execution slots, sorted by name), and which may be served by an online shared node
    of their class."""
    if not model_ids:
        return {}, set()
    dedicated = (
        select(Worker.model_id, PoolNode.name, PoolNode.concurrency)
        .join(PoolNode, PoolNode.name == Worker.node_name)  # type: ignore[arg-type]
        .where(col(Worker.model_id).in_(model_ids), Worker.status == WorkerStatus.UP, PoolNode.status == NodeStatus.ONLINE)
    )
    # A shared node counts for a model whose serving version's backend is among its capabilities.
    shared = (
        select(Model.id, ModelVersion.backend, PoolNode)
        .join(PoolNode, PoolNode.host_class == Model.hardware)  # type: ignore[arg-type]
        .join(ModelVersion, (col(ModelVersion.model_id) == Model.id) & (col(ModelVersion.number) == Model.version))
        .where(col(Model.id).in_(model_ids), col(PoolNode.shared).is_(True), PoolNode.status == NodeStatus.ONLINE)
    )
    runnable = {model_id for model_id, backend, node in session.exec(shared) if can_run(node, {backend})}
    nodes: dict[str, list[tuple[str, int]]] = {}
    for model_id, node, slots in session.exec(dedicated):
        nodes.setdefault(model_id, []).append((node, max(1, slots or 1)))
    return {model_id: tuple(sorted(up)) for model_id, up in nodes.items()}, runnable


def check_query(grant: TokenGrant, model_id: str, wait_for_worker: bool = False, mode: Route = Route.AUTO) -> ModelGrant:
    """May this grant run a query on ``model_id`` now? The model's grant if so. With no
    worker up for it (dedicated or shared), refused at once unless the caller asked to wait
    for one; :func:`route` then says where it goes."""
    grant.check_unexpired()
    model = grant.find(model_id)
    if model is None:
        raise TokenNotForModel(
            "This access token is not assigned to the model the ciphertext was encrypted for "
            "(it was unassigned, or never assigned); ask the model's provider."
        )
    if model.status != ModelStatus.ACTIVE:
        raise ModelInactive(
            f"Model {model.name!r} is {model.status.value}, not active; its provider must activate it before it accepts queries."
        )
    if not model.serving and not wait_for_worker and mode == Route.AUTO:
        raise NoWorkerUp(
            f"Model {model.name!r} has no worker up: its provider must start one (`cipherpool worker start "
            f"{model.name}`), or submit with wait_for_worker to queue the query until one is up."
        )
    if route(model, mode, wait_for_worker) == Route.SHARED and not grant.in_credit:
        raise InsufficientCredits(
            f"Model {model.name!r} cannot take shared-node queries now: its provider's credits "
            "are used up. Ask the provider to add credits, or query a dedicated worker."
        )
    return model


def route(model: ModelGrant, asked: Route = Route.AUTO, wait_for_worker: bool = False) -> Route:
    """Where a query for ``model`` goes: its dedicated workers' queue or the shared nodes' of
    its class. ``auto`` prefers a dedicated worker that is up; a caller who waits for a worker
    waits in the dedicated queue (or the shared one, if it asked for shared)."""
    if asked == Route.SHARED or (asked == Route.AUTO and not model.dedicated and model.shared):
        if not model.allows_shared:  # waiting does not help: its provider must allow them
            raise NoWorkerUp(
                f"Model {model.name!r} does not allow shared nodes (its provider decides: "
                "`cipherpool model update --shared`); query its dedicated workers instead."
            )
        if not model.shared_online and not wait_for_worker:
            raise NoWorkerUp(
                f"No shared {model.hardware} node is online for model {model.name!r}; submit with "
                "wait_for_worker to queue the query until one is, or query its dedicated workers."
            )
        return Route.SHARED
    if not model.dedicated and not wait_for_worker:
        raise NoWorkerUp(
            f"Model {model.name!r} has no dedicated worker up: its provider must start one "
            f"(`cipherpool worker start {model.name}`), or submit with wait_for_worker."
        )
    return Route.DEDICATED


def pick_model(grant: TokenGrant, name: str | None) -> ModelGrant:
    """The model a client names, or the token's only one."""
    if name is not None:
        found = next((m for m in grant.models if m.name == name), None)
        if found is None:
            raise TokenNotForModel(f"This access token is not assigned to a model named {name!r}.")
        return found
    if not grant.models:
        raise TokenNotForModel("This access token is not assigned to any model; ask the model's provider.")
    if len(grant.models) > 1:
        names = ", ".join(m.name for m in grant.models)
        raise InvalidInput(f"This access token queries several models ({names}): name one (model=...).")
    return grant.models[0]


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise InvalidEvaluationKey("A key id is 32 lowercase hex characters, as generate_keys() makes it.")
    return key_id


def check_specs(model: ModelGrant, client_blob: str | None, made_for: int | None = None) -> str:
    """The client specs a key set was generated from must be the serving version's;
    ``made_for``: the version they were made for, when known (named in the refusal)."""
    if client_blob is not None and client_blob != model.client_blob:
        made = f"were made for version {made_for}" if made_for is not None else "were made from other client specs"
        raise KeysOutdated(
            f"These keys {made}; model {model.name!r} serves version {model.version}, whose client specs differ: {REGENERATE}."
        )
    return model.client_blob


def check_room(
    session: Session,
    grant: TokenGrant,
    key_id: str,
    max_keys: int | None,
    size: int | None = None,
    quotas: KeyQuotas | None = None,
) -> EvaluationKey | None:
    """The key set's row if this token registered it already (expired or not); TooManyKeys if
    it may not register another (at most ``max_keys`` live key sets per token); with ``size``,
    the typed refusal of a quota it would pass (:func:`keysets.check_quota`). Cheap: the
    gateway asks before it reads an upload's body (with its declared length, if any)."""
    check_key_id(key_id)
    row = session.exec(
        select(EvaluationKey).where(EvaluationKey.token_id == grant.token_id, EvaluationKey.key_id == key_id)
    ).first()
    if (row is None or row.expired_at is not None) and max_keys is not None:
        count = session.exec(
            select(func.count()).where(EvaluationKey.token_id == grant.token_id, col(EvaluationKey.expired_at).is_(None))
        ).one()
        if count >= max_keys:
            raise TooManyKeys(
                f"This token has {count} key sets already (the limit): reuse one of them, or delete "
                "one it no longer uses (`cipherpool query keys delete`)."
            )
    if size is not None and quotas is not None:
        keysets.check_quota(session, grant.token_id, grant.account_id, key_id, size, quotas)
    return row


def register_key(
    session: Session,
    grant: TokenGrant,
    model: ModelGrant,
    key_id: str,
    blob_id: str,
    size_bytes: int,
    client_blob: str | None = None,
    max_keys: int | None = None,
    quotas: KeyQuotas | None = None,
) -> EvaluationKey:
    """Record that this token's client key set ``key_id``, made from ``client_blob`` (default:
    the serving version's specs) for ``model``, evaluates with blob ``blob_id``; idempotent. A
    re-upload under the same id replaces the blob (the one it held is marked for the sweep) and
    revives an expired key set; either way its idle time starts again.

    Within ``quotas`` (checked under the account's advisory lock on PostgreSQL, after the row
    is written on SQLite, whose writers take turns), so two uploads at once cannot pass one
    together. The blob's sweep mark is deleted here: write the blob into the store only after
    this (:mod:`cipherpool.services.blobs`)."""
    specs = check_specs(model, client_blob)
    if quotas is not None and (quotas.per_token or quotas.per_account):
        keysets.lock_account_keys(session, grant.account_id)
    row = check_room(session, grant, key_id, max_keys) or EvaluationKey(
        key_id=key_id, token_id=grant.token_id, model_id=model.model_id, blob_id=blob_id, size_bytes=size_bytes
    )
    replaced = row.blob_id if row.id is not None and row.expired_at is None and row.blob_id != blob_id else None
    row.blob_id, row.size_bytes, row.model_id, row.client_blob = blob_id, size_bytes, model.model_id, specs
    row.expired_at, row.last_used_at = None, utcnow()
    session.add(row)
    session.flush()
    if quotas is not None:
        keysets.check_quota(session, grant.token_id, grant.account_id, key_id, size_bytes, quotas)
    blobs.unmark(session, BlobKind.EVALUATION_KEY, blob_id)
    if replaced is not None:
        blobs.mark(session, [(BlobKind.EVALUATION_KEY, replaced)])
    return row


def key_ref(session: Session, token_id: str, key_id: str) -> KeyRef | None:
    row = session.exec(select(EvaluationKey).where(EvaluationKey.token_id == token_id, EvaluationKey.key_id == key_id)).first()
    if row is None:
        return None
    return KeyRef(
        row.blob_id,
        row.model_id,
        row.client_blob,
        keysets.made_for(session, row.model_id, row.client_blob),
        row.expired_at is not None,
    )


def check_key(ref: KeyRef | None, model: ModelGrant) -> str:
    """The blob id of a key set usable for ``model`` now; why not otherwise: not found,
    outdated (made for another version's client specs: new keys are needed) or expired (the
    same keys may be uploaded again)."""
    if ref is None or ref.model_id != model.model_id:
        raise EvaluationKeyNotFound(
            "No evaluation key with this id was uploaded with this token for this model; "
            "call upload_evaluation_keys() (CLI: `cipherpool query upload-keys`) first."
        )
    check_specs(model, ref.client_blob, ref.version)
    if ref.expired:
        raise EvaluationKeyExpired(
            f"This key set expired (unused too long, or its token expired) and its evaluation key was removed; "
            f"model {model.name!r} serves version {model.version}, which these keys were made for: upload them again "
            "(QueryClient does, by itself; CLI: `cipherpool query upload-keys`)."
        )
    return ref.blob_id


def key_blob(session: Session, grant: TokenGrant, model: ModelGrant, key_id: str) -> str:
    """The blob id of the evaluation key this grant's key set ``key_id`` uploaded for ``model``."""
    return check_key(key_ref(session, grant.token_id, key_id), model)
