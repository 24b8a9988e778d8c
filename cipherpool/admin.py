"""The operator's handle on accounts, where the database is: ``Admin(settings)``.

Operator acts are not on the gateway: the gateway is the door for providers and end users
(docs/architecture.md, 'The gateway is the only door'), and an account is made or disabled by whoever runs the platform, with its
database credentials (as `cipherpool admin ...` does).

Disabling an account refuses its API key and its tokens at once (within a gateway's cache
TTL, at most 5 s) and stops its workers: at once when a broker is configured, else by each
node at its next heartbeat (the node sees that its worker is no longer wanted). Nothing is
deleted; enabling the account again restores key and tokens (workers are started again by
the provider).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from celery import Celery

from cipherpool import lifecycle
from cipherpool.announce import credentials_changed
from cipherpool.api.schemas import AccountCreated, AccountOut, LedgerLine, NodeOut
from cipherpool.billing import ledger, payments, views
from cipherpool.billing.money import to_credits
from cipherpool.config.settings import Settings, get_settings
from cipherpool.context import PlatformContext
from cipherpool.db import init_db
from cipherpool.errors import CipherpoolError
from cipherpool.files import private_sqlite
from cipherpool.services import accounts
from cipherpool.services import nodes as node_service
from cipherpool.services import workers as worker_service
from cipherpool.statuses import LedgerKind, StopReason

log = logging.getLogger("cipherpool.admin")
DISABLED = StopReason.ACCOUNT_DISABLED


@dataclass(frozen=True)
class Disabled:
    account: AccountOut
    workers_stopped: list[str]


class Admin:
    def __init__(self, settings: Settings | None = None):
        self.ctx = PlatformContext(settings or get_settings())
        url = self.ctx.db_url
        private_sqlite(url)
        init_db(url)

    def create_account(self, name: str, *, organisation: str | None = None, contact_email: str | None = None) -> AccountCreated:
        """A new account; its API key is in the answer (shown once, stored only as a hash)."""
        with self.ctx.session() as session:
            account, api_key = accounts.create_account(
                session,
                name,
                organisation=organisation,
                contact_email=contact_email,
                signup_grant=self.ctx.settings.credits_signup_grant,
            )
            return AccountCreated(**accounts.describe(account).model_dump(), api_key=api_key)

    def list_accounts(self) -> list[AccountOut]:
        with self.ctx.session() as session:
            return [accounts.describe(a) for a in accounts.list_accounts(session)]

    def list_nodes(self) -> list[NodeOut]:
        """Every pool node with its binding, whoever's account it belongs to (the operator's view)."""
        with self.ctx.session() as session:
            return node_service.list_nodes(
                session,
                self.ctx.settings.node_heartbeat_s,
                held=lambda node: node_service.published_models(self.ctx.store.redis, node),
            )

    def get_account(self, id_or_name: str) -> AccountOut:
        with self.ctx.session() as session:
            return accounts.describe(accounts.find_account(session, id_or_name))

    def disable_account(self, id_or_name: str) -> Disabled:
        """Refuse the account's key and tokens, and stop its workers; nothing is deleted."""
        with self.ctx.session() as session:
            account = accounts.set_disabled(session, accounts.find_account(session, id_or_name), True)
            described, account_id = accounts.describe(account), account.id
            serving = [w.id for w in worker_service.serving(session, account_id=account_id)]
        self._announce()
        stopped = []
        app = self._celery()
        for worker_id in serving:
            try:
                if app is not None:
                    lifecycle.stop_worker(self.ctx, app, account_id, worker_id, DISABLED)
                else:  # the node unbinds at its next heartbeat
                    with self.ctx.session() as session:
                        worker_service.request_stop(
                            session,
                            accounts.find_account(session, account_id),
                            worker_id,
                            self.ctx.settings.node_heartbeat_s,
                            DISABLED,
                        )
                stopped.append(worker_id)
            except CipherpoolError as exc:
                log.warning("could not stop worker %s: %s", worker_id, exc.message)
        if app is not None:
            app.close()
        return Disabled(described, stopped)

    def enable_account(self, id_or_name: str) -> AccountOut:
        with self.ctx.session() as session:
            described = accounts.describe(accounts.set_disabled(session, accounts.find_account(session, id_or_name), False))
        self._announce()
        return described

    def grant_credits(
        self,
        id_or_name: str,
        amount: Decimal | str | int,
        *,
        kind: LedgerKind = LedgerKind.GRANT,
        note: str = "",
        key: str | None = None,
    ) -> LedgerLine:
        """Add a grant or refund (positive) or an adjustment (either sign) to an account's ledger;
        ``key`` makes a retried call add nothing twice."""
        with self.ctx.session() as session:
            account = accounts.find_account(session, id_or_name)
            line = payments.grant(session, account.id, amount, kind=kind, note=note, key=key)
            return views.lines_out(session, [line])[0]

    def settle_purchase(self, invoice: str, status: str = "paid") -> LedgerLine:
        """A pending purchase whose payment cleared (or an invoice accepted): credit it, once."""
        with self.ctx.session() as session:
            line = payments.settle_invoice(session, invoice, status)
            return views.lines_out(session, [line])[0]

    def credit_history(
        self,
        id_or_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: list[LedgerKind] | None = None,
    ) -> list[LedgerLine]:
        """An account's ledger lines (the operator's view of `credits history`)."""
        with self.ctx.session() as session:
            account = accounts.find_account(session, id_or_name)
            return views.lines_out(
                session, ledger.history(session, account.id, since=since, until=until, kinds=kinds, latest=since is None)
            )

    def credit_balance(self, id_or_name: str) -> Decimal:
        """An account's balance in credits: the sum of its ledger."""
        with self.ctx.session() as session:
            return to_credits(ledger.balance(session, accounts.find_account(session, id_or_name).id))

    def _celery(self) -> Celery | None:
        if not self.ctx.settings.broker_url:
            return None
        from cipherpool.config.celery import create_app

        app: Celery = create_app(self.ctx.settings, name="cipherpool-admin")
        return app

    def _announce(self) -> None:
        """Tell the gateways to drop their cached credentials now, if the store is reachable."""
        if not (self.ctx.settings.store_url or self.ctx.settings.broker_url):
            return
        credentials_changed(self.ctx)
