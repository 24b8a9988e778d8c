"""Calling an alert event's webhook: a signed JSON POST, retried with backoff, recorded.

Runs in a control worker (task ``WEBHOOK_TASK``, queued by :mod:`cipherpool.scheduler.alerts`
after the event is committed), never on a query's path. The task carries the event's id
only: the URL and the secret are read from the rule at each attempt, so neither travels
through the broker nor shows in Flower.

One attempt: resolve and check the destination (:mod:`cipherpool.alerts.destination`), POST
the body (:class:`~cipherpool.api.schemas.AlertWebhookBody`) with its signature
(:mod:`cipherpool.alerts.signature`), no redirects followed, within ``webhook_timeout_s``.

* 2xx: ``delivered``.
* 408, 429, 5xx, a timeout, a connection error, a name that does not resolve: tried again
  after ``webhook_backoff_s * 2**(attempt - 1)`` seconds (capped at :data:`MAX_BACKOFF_S`;
  a 429's ``Retry-After``, if longer and within the cap, wins), up to ``webhook_attempts`` calls.
* any other answer (4xx, a redirect) and a refused destination: ``failed`` at once: trying
  again would get the same answer.

Delivery is at least once: a receiver that answered 2xx after the timeout may get the same
``event_id`` again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import httpx
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy import CursorResult, update
from sqlmodel import Session, col

from cipherpool.alerts.destination import check_resolved
from cipherpool.alerts.rules import iso
from cipherpool.alerts.signature import EVENT_HEADER, SIGNATURE_HEADER, sign
from cipherpool.api.schemas import AlertWebhookBody
from cipherpool.clock import utcnow
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db.tables import AlertEvent, AlertRule, Model
from cipherpool.errors import RefusedDestination
from cipherpool.names import CONTROL_QUEUE, WEBHOOK_TASK
from cipherpool.statuses import AlertEventKind, AlertMetric, WebhookDelivery

log = logging.getLogger("cipherpool.alerts")

MAX_BACKOFF_S = 600.0  # the longest wait between two calls of one event (seconds)
RETRIED_STATUSES = frozenset({408, 429})  # 4xx answers that say "later", not "never"
MAX_ERROR_CHARS = 300  # of an error kept on the event


def backoff_s(attempt: int, base_s: float, retry_after_s: float | None = None) -> float:
    """How long to wait after failed call number ``attempt`` (1 for the first)."""
    wait = min(base_s * 2.0 ** max(0, attempt - 1), MAX_BACKOFF_S)
    if retry_after_s is not None:
        wait = max(wait, min(retry_after_s, MAX_BACKOFF_S))
    return wait


@dataclass(frozen=True)
class Call:
    """What one attempt sends, read from the event and its rule."""

    url: str
    secret: str
    body: bytes
    kind: str


@dataclass(frozen=True)
class Answer:
    """How one call went: ``error`` None is delivered; ``retry`` says whether to call again."""

    error: str | None
    retry: bool = False
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    """An event's delivery after an attempt; ``retry_in_s``: call again after that long."""

    event_id: int
    delivery: WebhookDelivery
    attempts: int
    error: str | None = None
    retry_in_s: float | None = None


def body_of(event: AlertEvent, rule: AlertRule, model_name: str) -> bytes:
    """The JSON body, compact, in the wire model's field order (the bytes signed are the
    bytes sent; a receiver verifies those bytes, never a re-serialisation)."""
    assert event.id is not None
    body = AlertWebhookBody(
        event_id=event.public_id,
        rule_id=event.rule_id,
        model=model_name,
        model_id=event.model_id,
        metric=AlertMetric(event.metric),
        kind=AlertEventKind(event.kind),
        value=event.value,
        threshold=event.threshold,
        window_s=rule.window_s,
        at=iso(event.at),
    )
    return body.model_dump_json().encode()


def prepare(session: Session, event_id: int) -> Call | Outcome:
    """The call to make for a pending event, or the event's outcome when there is none to make
    (not pending any more, or its rule or webhook removed meanwhile: given up)."""
    event = session.get(AlertEvent, event_id)
    if event is None:
        return Outcome(event_id, WebhookDelivery.FAILED, 0, "no such event")
    if event.delivery != WebhookDelivery.PENDING.value:
        return Outcome(event_id, WebhookDelivery(event.delivery), event.attempts, event.last_error)
    rule = session.get(AlertRule, event.rule_id)
    model = session.get(Model, event.model_id)
    if rule is None or rule.webhook_url is None or rule.webhook_secret is None or model is None:
        return record(session, event_id, Answer("the alert or its webhook was removed"), attempted=False)
    return Call(rule.webhook_url, rule.webhook_secret, body_of(event, rule, model.name), event.kind)


def post(call: Call, settings: Settings, transport: httpx.BaseTransport | None = None) -> Answer:
    """Make one call. The platform's environment (proxies, .netrc credentials) is not lent to
    a provider's URL: ``trust_env`` is off."""
    try:
        check_resolved(call.url, settings.webhook_allow_private)
    except RefusedDestination as exc:
        return Answer(exc.message)
    except OSError as exc:
        return Answer(f"cannot resolve the webhook's host: {exc}", retry=True)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": user_agent(),
        SIGNATURE_HEADER: sign(call.secret, call.body),
        EVENT_HEADER: call.kind,
    }
    try:
        with httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            response = client.post(call.url, content=call.body, headers=headers)
    except httpx.HTTPError as exc:
        return Answer(f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], retry=True)
    return judge(response)


def judge(response: httpx.Response) -> Answer:
    """A receiver's answer as an :class:`Answer` (see the module: what is tried again)."""
    status = response.status_code
    if 200 <= status < 300:
        return Answer(None)
    error = f"HTTP {status}: {response.text[:200]}".strip()
    if status in RETRIED_STATUSES or status >= 500:
        return Answer(error, retry=True, retry_after_s=_retry_after(response))
    if 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed; set the webhook to its final URL"
    return Answer(error)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff's own wait


def record(
    session: Session, event_id: int, answer: Answer, *, attempted: bool = True, settings: Settings | None = None
) -> Outcome:
    """Write how the attempt went on the event and decide what comes next (with no
    ``settings``, no retry). Compare-and-set on the attempts read: a second copy of the same
    task, racing this one, finds the event changed and records nothing twice."""
    event = session.get(AlertEvent, event_id)
    assert event is not None
    attempts = event.attempts + (1 if attempted else 0)
    most = settings.webhook_attempts if settings is not None else 0
    retry = answer.error is not None and answer.retry and attempts < most
    delivery = WebhookDelivery.DELIVERED if answer.error is None else WebhookDelivery.PENDING if retry else WebhookDelivery.FAILED
    changes: dict[str, Any] = {"attempts": attempts, "delivery": delivery.value, "last_error": answer.error}
    if answer.error is None:
        changes["delivered_at"] = utcnow()
    done = cast(
        CursorResult[Any],
        session.execute(
            update(AlertEvent)
            .where(
                col(AlertEvent.id) == event_id,
                col(AlertEvent.delivery) == WebhookDelivery.PENDING.value,
                col(AlertEvent.attempts) == event.attempts,
            )
            .values(**changes)
        ),
    )
    if done.rowcount != 1:
        session.refresh(event)
        return Outcome(event_id, WebhookDelivery(event.delivery), event.attempts, event.last_error)
    wait = backoff_s(attempts, settings.webhook_backoff_s, answer.retry_after_s) if retry and settings else None
    return Outcome(event_id, delivery, attempts, answer.error, wait)


def attempt(ctx: PlatformContext, event_id: int, transport: httpx.BaseTransport | None = None) -> Outcome:
    """One attempt at an event's call: read it, call outside any transaction, record it."""
    with ctx.session() as session:
        call = prepare(session, event_id)
    if isinstance(call, Outcome):
        return call
    answer = post(call, ctx.settings, transport)
    with ctx.session() as session:
        outcome = record(session, event_id, answer, settings=ctx.settings)
    if outcome.error is not None:
        log.info(
            "webhook of alert event %d: attempt %d: %s (%s)", event_id, outcome.attempts, outcome.error, outcome.delivery.value
        )
    return outcome


def give_up(ctx: PlatformContext, event_id: int, reason: str) -> None:
    """Mark a pending event's call failed without making it (it could not be queued)."""
    with ctx.session() as session:
        record(session, event_id, Answer(reason), attempted=False)


def queue_call(app: Celery, event_id: int) -> bool:
    """Queue the call on the control queue (the event's id only); False if the broker refused."""
    try:
        app.send_task(WEBHOOK_TASK, kwargs={"event_id": event_id}, queue=CONTROL_QUEUE)
    except OperationalError as exc:
        log.warning("webhook of alert event %d not queued: %s", event_id, exc)
        return False
    return True


def user_agent() -> str:
    from cipherpool.version import __version__

    return f"cipherpool-webhook/{__version__}"
