"""Provider endpoints for performance alerts (bearer API key): set, list, remove, history.

A rule is keyed by its model and metric, so setting is a PUT of the rule's description: the
same body twice leaves one rule. Beat evaluates the rules (:mod:`cipherpool.scheduler.alerts`);
nothing here is on a query's path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from cipherpool.alerts import rules
from cipherpool.api.schemas import ID_PATTERN, NAME_PATTERN, AlertEventOut, AlertIn, AlertOut, AlertSet
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.services import accounts

router = APIRouter(prefix="/v1/alerts", tags=["provider"])
AlertId = Annotated[str, Path(pattern=ID_PATTERN)]
ModelFilter = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.put("", response_model=AlertSet)
def set_alert(body: AlertIn, gw: Gateway, acct: Account) -> AlertSet:
    """Create the model's rule for the metric, or replace its threshold (and the window and
    webhook, if given). A new webhook's signing secret is in this answer only."""
    webhook = body.webhook_url if "webhook_url" in body.model_fields_set else rules.KEEP
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        done = rules.set_rule(
            session,
            account,
            body.model,
            body.metric,
            body.threshold,
            window_s=body.window_s,
            webhook_url=webhook,
            new_secret=body.new_secret,
            default_window_s=gw.settings.stats_window_s,
            allow_private=gw.settings.webhook_allow_private,
        )
        shown = rules.describe(done.rule, body.model)
        return AlertSet(**shown.model_dump(), created=done.created, webhook_secret=done.secret)


@router.get("", response_model=list[AlertOut])
def list_alerts(gw: Gateway, acct: Account, model: ModelFilter = None) -> list[AlertOut]:
    """The account's rules (of one model), with their state and last figure; never a secret."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [rules.describe(rule, name) for rule, name in rules.list_rules(session, account, model)]


@router.get("/events", response_model=list[AlertEventOut])
def alert_events(
    gw: Gateway, acct: Account, model: ModelFilter = None, limit: Annotated[int, Query(ge=1, le=rules.MAX_EVENTS)] = 100
) -> list[AlertEventOut]:
    """The latest alerts fired and cleared (of one model), oldest first, with how each
    webhook call went; kept after their rule is removed."""
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        return [rules.describe_event(event, name) for event, name in rules.list_events(session, account, model, limit)]


@router.delete("/{alert_id}", status_code=204)
def remove_alert(alert_id: AlertId, gw: Gateway, acct: Account) -> Response:
    """Delete the rule; its events stay in the history."""
    with gw.ctx.session() as session:
        rules.remove_rule(session, accounts.get_account(session, acct.account_id), alert_id)
    return Response(status_code=204)
