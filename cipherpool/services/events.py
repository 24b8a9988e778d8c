"""A model's event log: what happened to it, its versions, workers and token assignments.

Written by the services that make the change, in the same transaction (an event is never
recorded for a change that was rolled back, nor lost for one that was committed). Read with
a cursor (``after`` an event id) so that ``model events --follow`` sees each event once.

An event is shown by its opaque ``public_id`` (``ev_…``), never by the integer sequence that
orders every account's events together: a cursor is resolved to its row within the model.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session, col, delete, select

from cipherpool.api.schemas import EventOut
from cipherpool.clock import utcnow
from cipherpool.db.tables import Model, ModelEvent
from cipherpool.errors import InvalidInput
from cipherpool.statuses import EventKind

MAX_EVENTS = 1000


def record(
    session: Session,
    model: Model,
    kind: EventKind,
    message: str,
    *,
    worker_id: str | None = None,
    version: int | None = None,
    token_id: str | None = None,
) -> ModelEvent:
    event = ModelEvent(
        account_id=model.account_id,
        model_id=model.id,
        kind=kind.value,
        message=message,
        worker_id=worker_id,
        version=version,
        token_id=token_id,
        at=utcnow(),
    )
    session.add(event)
    return event


def record_for(session: Session, model_id: str, kind: EventKind, message: str, **refs: str | int | None) -> None:
    """:func:`record` for a model named by id (from a node or a worker row); nothing if it is gone."""
    model = session.get(Model, model_id)
    if model is not None:
        record(session, model, kind, message, **refs)  # type: ignore[arg-type]


def list_events(
    session: Session, model: Model, *, after: str | None = None, since: datetime | None = None, limit: int = MAX_EVENTS
) -> list[ModelEvent]:
    """The model's events in order, after event ``after`` (an id it listed) and/or at or after
    ``since``. An ``after`` that is no event of this model is refused (InvalidInput), the same
    whether it is another model's, another account's or nobody's."""
    query = select(ModelEvent).where(ModelEvent.model_id == model.id)
    if after is not None:
        position = session.exec(
            select(ModelEvent.id).where(ModelEvent.model_id == model.id, ModelEvent.public_id == after)
        ).first()
        if position is None:
            raise InvalidInput(f"No event {after[:40]!r} in this model's log: pass the id of an event it listed.")
        query = query.where(col(ModelEvent.id) > position)
    if since is not None:  # compared in UTC (SQLite stores the digits without the offset)
        since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        query = query.where(col(ModelEvent.at) >= since)
    return list(session.exec(query.order_by(col(ModelEvent.id)).limit(max(1, min(limit, MAX_EVENTS)))))


def delete_events(session: Session, model_id: str) -> None:
    """At once, in SQL: deleted through the session, the rows could be flushed after the model
    row they reference (nothing tells the flush which goes first), which a foreign key refuses."""
    session.exec(delete(ModelEvent).where(col(ModelEvent.model_id) == model_id))


def describe(event: ModelEvent, model_name: str) -> EventOut:
    return EventOut(
        id=event.public_id,
        at=event.at.isoformat(),
        model=model_name,
        kind=event.kind,
        message=event.message,
        worker_id=event.worker_id,
        version=event.version,
        token_id=event.token_id,
    )
