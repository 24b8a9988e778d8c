"""Rolling a model onto another version (a new one, or an earlier one: rollback).

The protocol, so that no query is dropped and none is answered by a half-loaded model:

1. :func:`begin` sets ``model.rollout_version``; queries keep using ``model.version``.
2. Each node serving the model loads the new version *beside* the serving one, one node at a
   time (a lock per model), then reports it (:func:`worker_loaded`). A version is usable on a
   node only once fully loaded.
3. When every running worker holds it, :func:`worker_loaded` flips ``model.version``: from
   then on the gateway sends queries (and accepts keys) for the new version only.
4. Nodes keep the old version until queries already queued for it have passed their
   deadline, then drop it (:func:`versions_to_hold`).

With no running worker the flip is immediate. Keys generated from another version's client
specs are refused with ``KeysOutdated`` (the client generates keys again).
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from cipherpool.db.tables import Model, NodeStatus, PoolNode, Worker
from cipherpool.services import events
from cipherpool.statuses import WANTED, EventKind


def begin(session: Session, model: Model, number: int) -> None:
    """Start serving version ``number``: at once when no worker runs, else by rollout."""
    if number == model.version:
        if model.rollout_version is not None:  # an unfinished rollout is abandoned
            model.rollout_version = None
            session.add(model)
            events.record(
                session, model, EventKind.VERSION_SERVING, f"version {number} serving; rollout abandoned", version=number
            )
        return
    holding = _holding(session, model.id)
    if not holding:
        _flip(session, model, number)
        return
    model.rollout_version = number
    session.add(model)
    events.record(
        session,
        model,
        EventKind.ROLLOUT_STARTED,
        f"rolling out version {number} to {len(holding)} worker(s), one at a time",
        version=number,
    )


def worker_loaded(session: Session, worker_id: str, number: int) -> bool:
    """A worker holds version ``number`` now; True when that completed the rollout (the flip)."""
    worker = session.get(Worker, worker_id)
    model = session.get(Model, worker.model_id) if worker else None
    if worker is None or model is None:
        return False
    worker.version = number
    session.add(worker)
    if model.rollout_version != number:
        return False
    events.record(
        session,
        model,
        EventKind.WORKER_LOADED_VERSION,
        f"worker {worker.id} on {worker.node_name} loaded version {number}",
        worker_id=worker.id,
        version=number,
    )
    return complete_if_held(session, model)


def complete_if_held(session: Session, model: Model) -> bool:
    """Flip to the rollout version if every worker starting or running holds it; True if it
    flipped. Asked when a worker reports the version, comes up, or stops (it may have been the
    last worker without it).

    Each caller has written its own worker row first; the model row is then locked (FOR UPDATE)
    before the workers are read, so of two concurrent callers the second sees the first's
    committed row, and the last one to report always makes the flip."""
    session.flush()
    locked = session.exec(select(Model).where(Model.id == model.id).with_for_update()).first()
    session.refresh(model)
    number = locked.rollout_version if locked is not None else None
    if number is None:
        return False
    if all(w.version == number for w in _holding(session, model.id)):
        _flip(session, model, number)
        return True
    return False


def versions_to_hold(model: Model) -> set[int]:
    """The versions a node serving ``model`` must have loaded (or be loading)."""
    return {model.version} | ({model.rollout_version} if model.rollout_version is not None else set())


def _flip(session: Session, model: Model, number: int) -> None:
    model.version, model.rollout_version = number, None
    session.add(model)
    events.record(session, model, EventKind.VERSION_SERVING, f"version {number} serving", version=number)


def _holding(session: Session, model_id: str) -> list[Worker]:
    """Workers starting or running on an online node: each must hold a version before the
    flip (a starting one reports when it comes up; a lost node's worker is failed by beat's
    reconciler, which asks again)."""
    return list(
        session.exec(
            select(Worker)
            .join(PoolNode, PoolNode.name == Worker.node_name)  # type: ignore[arg-type]
            .where(Worker.model_id == model_id, col(Worker.status).in_(WANTED), PoolNode.status == NodeStatus.ONLINE)
        )
    )
