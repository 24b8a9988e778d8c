"""Alert rules of an account's models: set, list, remove, and the events they recorded.

A rule is one threshold on one of a model's figures (:class:`~cipherpool.statuses.AlertMetric`),
over a window; a model has at most one rule per metric, so setting a metric again replaces
its rule's threshold (and whatever else is given) in place. The rule keeps its state: an
alert firing stays firing until the next evaluation compares the figure with the new
threshold, and that clearing is recorded (and sent) like any other.

Tenant-scoped like every service: another account's model or rule is "not found", with the
very answer a name or id that exists nowhere gets. The caller owns the transaction.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from cipherpool.alerts.destination import check_url
from cipherpool.api.schemas import ALERT_MAX_WINDOW_S, ALERT_MIN_WINDOW_S, AlertEventOut, AlertOut
from cipherpool.clock import utcnow
from cipherpool.db.tables import Account, AlertEvent, AlertRule, Model
from cipherpool.errors import AlertNotFound, Conflict, InvalidInput, TooManyAlerts
from cipherpool.services.models import get_model
from cipherpool.statuses import AlertMetric

MAX_RULES_PER_ACCOUNT = 100  # 5 metrics on each of 20 models
MAX_EVENTS = 1000  # the most events one listing returns
SECRET_BYTES = 32  # a webhook secret's randomness (token_urlsafe: 43 characters)


class Keep(Enum):
    """``webhook_url=KEEP``: leave the rule's webhook as it is (``None`` removes it)."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class RuleSet:
    """What :func:`set_rule` did: the rule, whether it is new, and a new webhook's secret
    (the only time it is shown; it is not in any listing)."""

    rule: AlertRule
    created: bool
    secret: str | None


def parse_metric(metric: AlertMetric | str) -> AlertMetric:
    try:
        return AlertMetric(metric)
    except ValueError:
        names = ", ".join(m.value for m in AlertMetric)
        raise InvalidInput(f"Unknown alert metric {metric!r}: use one of {names}.") from None


def check_threshold(metric: AlertMetric, threshold: float) -> float:
    """A threshold is a finite number >= 0 (seconds, a count of queries), and at most 1 for a
    rate: an error rate never goes above 1, so a higher threshold would never fire."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise InvalidInput(f"An alert threshold is a finite number, not {threshold!r}.")
    if threshold < 0:
        raise InvalidInput(f"An alert threshold is 0 or more, not {threshold}.")
    if metric.is_rate and threshold > 1:
        raise InvalidInput(f"An {metric.value} threshold is between 0 and 1 (0.05 is 5%), not {threshold}.")
    return float(threshold)


def check_window(window_s: int) -> int:
    if isinstance(window_s, bool) or not isinstance(window_s, int) or not (ALERT_MIN_WINDOW_S <= window_s <= ALERT_MAX_WINDOW_S):
        raise InvalidInput(f"An alert's window is {ALERT_MIN_WINDOW_S} to {ALERT_MAX_WINDOW_S} seconds, not {window_s!r}.")
    return window_s


def set_rule(
    session: Session,
    account: Account,
    model_name: str,
    metric: AlertMetric | str,
    threshold: float,
    *,
    window_s: int | None = None,
    webhook_url: str | None | Literal[Keep.KEEP] = KEEP,
    new_secret: bool = False,
    default_window_s: int = 300,
    allow_private: bool = False,
) -> RuleSet:
    """Create the model's rule for ``metric``, or replace its threshold and what else is given
    (``window_s`` None and ``webhook_url`` KEEP leave those as they are)."""
    metric = parse_metric(metric)
    model = get_model(session, account, model_name)
    threshold = check_threshold(metric, threshold)
    window = None if window_s is None else check_window(window_s)
    if isinstance(webhook_url, str):  # checked before anything changes
        webhook_url = check_url(webhook_url, allow_private)
    rule = _rule_of(session, model.id, metric)
    created = rule is None
    if rule is None:
        _check_room(session, account)
        rule = AlertRule(
            account_id=account.id,
            model_id=model.id,
            metric=metric.value,
            threshold=threshold,
            window_s=window or check_window(default_window_s),
        )
    secret = _apply_webhook(rule, webhook_url, new_secret)  # it refuses before it changes anything
    rule.threshold, rule.window_s = threshold, window or rule.window_s
    rule.updated_at = utcnow()
    _save(session, rule)
    return RuleSet(rule, created, secret)


def _rule_of(session: Session, model_id: str, metric: AlertMetric) -> AlertRule | None:
    return session.exec(select(AlertRule).where(AlertRule.model_id == model_id, AlertRule.metric == metric.value)).first()


def _check_room(session: Session, account: Account) -> None:
    count = session.exec(select(func.count()).select_from(AlertRule).where(AlertRule.account_id == account.id)).one()
    if count >= MAX_RULES_PER_ACCOUNT:
        raise TooManyAlerts(f"This account has {count} alert rules, the most it may have: remove one first.")


def _apply_webhook(rule: AlertRule, url: str | None | Literal[Keep.KEEP], new_secret: bool) -> str | None:
    """Set (a checked URL), keep or remove the webhook; the new secret when there is one. A URL
    set again as it was keeps its secret (the receiver keeps verifying); ``new_secret``
    replaces it."""
    if url is KEEP:
        url = rule.webhook_url
        if url is None and new_secret:
            raise InvalidInput("This alert has no webhook to make a new secret for: give its URL.")
    if url is None:
        if new_secret:
            raise InvalidInput("A new secret needs a webhook: give its URL.")
        rule.webhook_url = rule.webhook_secret = None
        return None
    if url == rule.webhook_url and rule.webhook_secret is not None and not new_secret:
        return None
    rule.webhook_url, rule.webhook_secret = url, secrets.token_urlsafe(SECRET_BYTES)
    return rule.webhook_secret


def _save(session: Session, rule: AlertRule) -> None:
    """Flush in a savepoint: a rule for the same model and metric set at the same moment by
    another request is a conflict to retry, not a failed transaction."""
    try:
        with session.begin_nested():
            session.add(rule)
    except IntegrityError:
        raise Conflict("This alert was set by another request at the same moment: set it again.") from None


def get_rule(session: Session, account: Account, rule_id: str) -> AlertRule:
    rule = session.get(AlertRule, rule_id)
    if rule is None or rule.account_id != account.id:
        raise AlertNotFound(f"No alert {rule_id!r} in this account.")
    return rule


def list_rules(session: Session, account: Account, model_name: str | None = None) -> list[tuple[AlertRule, str]]:
    """The account's rules (of one model if named), with their model's name."""
    query = (
        select(AlertRule, Model.name).join(Model, col(Model.id) == AlertRule.model_id).where(AlertRule.account_id == account.id)
    )
    if model_name is not None:
        query = query.where(AlertRule.model_id == get_model(session, account, model_name).id)
    return [(rule, name) for rule, name in session.exec(query.order_by(col(Model.name), col(AlertRule.metric)))]


def remove_rule(session: Session, account: Account, rule_id: str) -> AlertRule:
    """Delete the rule; its events stay in the history (a webhook call under way gives up)."""
    rule = get_rule(session, account, rule_id)
    session.delete(rule)
    session.flush()
    return rule


def list_events(
    session: Session, account: Account, model_name: str | None = None, limit: int = 100
) -> list[tuple[AlertEvent, str]]:
    """The latest ``limit`` events (of one model if named), oldest first, with the model's name."""
    query = (
        select(AlertEvent, Model.name)
        .join(Model, col(Model.id) == AlertEvent.model_id)
        .where(AlertEvent.account_id == account.id)
    )
    if model_name is not None:
        query = query.where(AlertEvent.model_id == get_model(session, account, model_name).id)
    latest = session.exec(query.order_by(col(AlertEvent.id).desc()).limit(max(1, min(limit, MAX_EVENTS))))
    return list(reversed(list(latest)))


# ---- what the API shows ------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC (SQLite hands datetimes back naive; they are UTC)."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).isoformat()


def maybe_iso(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def describe(rule: AlertRule, model_name: str) -> AlertOut:
    return AlertOut(
        id=rule.id,
        model=model_name,
        model_id=rule.model_id,
        metric=AlertMetric(rule.metric),
        threshold=rule.threshold,
        window_s=rule.window_s,
        webhook_url=rule.webhook_url,
        state=rule.state,
        value=rule.value,
        evaluated_at=maybe_iso(rule.evaluated_at),
        changed_at=maybe_iso(rule.changed_at),
        created_at=iso(rule.created_at),
        updated_at=iso(rule.updated_at),
    )


def describe_event(event: AlertEvent, model_name: str) -> AlertEventOut:
    return AlertEventOut(
        id=event.public_id,
        rule_id=event.rule_id,
        model=model_name,
        metric=AlertMetric(event.metric),
        kind=event.kind,
        value=event.value,
        threshold=event.threshold,
        at=iso(event.at),
        delivery=event.delivery,
        attempts=event.attempts,
        last_error=event.last_error,
        delivered_at=maybe_iso(event.delivered_at),
    )
