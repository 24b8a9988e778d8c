"""Acting on balances after a tick: workers stopped at zero, a warning before that.

At zero (or below: a tick charges what was used, even past zero) every worker of the
account is stopped within the tick, with the reason ``credits depleted`` in its status and a
``credits_depleted`` event on its model. Below ``credits_low_balance`` the account's models
get one ``credits_low`` event per crossing (cleared when credits are added).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from celery import Celery
from sqlmodel import Session, col, select

from cipherpool import lifecycle
from cipherpool.billing.money import show, to_micro
from cipherpool.clock import utcnow
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, Model, ModelStatus, Worker
from cipherpool.services import events
from cipherpool.statuses import WANTED, EventKind, StopReason

log = logging.getLogger("cipherpool.billing")


@dataclass
class Enforced:
    depleted: dict[str, list[str]] = field(default_factory=dict)  # account id -> workers stopped
    low: list[str] = field(default_factory=list)  # accounts that crossed the threshold this tick


def enforce(ctx: PlatformContext, app: Celery, settings: Settings, now: datetime | None = None) -> Enforced:
    """Stop the workers of accounts at or below zero; record low balances (beat, after charging)."""
    now = now or utcnow()
    done = Enforced()
    threshold = to_micro(settings.credits_low_balance, "credits_low_balance")
    with ctx.session() as session:
        for account in session.exec(
            select(Account).where(col(Account.balance_micro) < threshold, col(Account.low_balance_at).is_(None))
        ):
            account.low_balance_at = now
            session.add(account)
            for model_id in _models_in_use(session, account.id):
                events.record_for(
                    session,
                    model_id,
                    EventKind.CREDITS_LOW,
                    f"credit balance {show(account.balance_micro)} is below {show(threshold)}: add credits "
                    f"before it reaches 0, when every worker of the account stops",
                )
            done.low.append(account.id)
        for account in session.exec(
            select(Account).where(col(Account.balance_micro) >= threshold, col(Account.low_balance_at).is_not(None))
        ):
            account.low_balance_at = None  # credits were added: the next crossing warns again
            session.add(account)
        depleted = list(
            session.exec(
                select(Account.id, Account.balance_micro)
                .where(col(Account.balance_micro) <= 0)
                .where(col(Account.id).in_(select(Worker.account_id).where(col(Worker.status).in_(WANTED))))
            )
        )
        for account_id, balance in depleted:
            for model_id in _models_in_use(session, account_id, with_workers=True):
                events.record_for(
                    session,
                    model_id,
                    EventKind.CREDITS_DEPLETED,
                    f"credit balance {show(balance)}: stopping every worker of the account",
                )
    for account_id, balance in depleted:
        log.warning("account %s has %s credits: stopping its workers", account_id, show(balance))
        try:
            done.depleted[account_id] = lifecycle.stop_account_workers(ctx, app, account_id, StopReason.CREDITS)
        except Exception:  # noqa: BLE001 - the broker down, say: the next tick tries again; other accounts go on
            log.exception("could not stop the workers of account %s", account_id)
    return done


def _models_in_use(session: Session, account_id: str, with_workers: bool = False) -> list[str]:
    """The account's models with a worker wanted; without ``with_workers``, else its active ones."""
    serving = sorted(
        set(session.exec(select(Worker.model_id).where(Worker.account_id == account_id, col(Worker.status).in_(WANTED))))
    )
    if serving or with_workers:
        return serving
    return list(session.exec(select(Model.id).where(Model.account_id == account_id, Model.status == ModelStatus.ACTIVE)))
