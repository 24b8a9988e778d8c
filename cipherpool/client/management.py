"""ManagementClient: what a provider scripts against (deploy, workers, tokens), over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cipherpool.api.schemas import (
    AccountOut,
    AccountUpdate,
    AlertEventOut,
    AlertIn,
    AlertOut,
    AlertSet,
    ApiKeyRotated,
    AssignIn,
    AutoscaleIn,
    AutoscaleOut,
    CreditBalance,
    DeployIn,
    EventOut,
    LedgerLine,
    ModelDetail,
    ModelOut,
    ModelSettings,
    ModelStats,
    NodeOut,
    PurchaseIn,
    PurchaseOut,
    ReportOut,
    RollbackIn,
    ScheduleIn,
    ScheduleOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    TokenUpdate,
    UploadOut,
    UsageOut,
    VersionIn,
    VersionOut,
    WorkerIn,
    WorkerLogLine,
    WorkerOut,
    WorkerStats,
)
from cipherpool.client.base import GatewayClient
from cipherpool.client.transport import client_settings
from cipherpool.config.settings import Settings
from cipherpool.errors import InvalidInput, WorkerStartFailed
from cipherpool.fhe.deployment import load_deployment
from cipherpool.statuses import AlertMetric, LedgerKind, WorkerStatus
from cipherpool.waiting import WaitTimeout, wait_until

POLL_S = 0.25
FOLLOW_POLL_S = 1.0
UNSET: Any = object()  # "leave unchanged", where None means "clear"
UPLOAD_TIMEOUT_S = 600.0


WorkerInfo = WorkerOut  # the name of 0.1, kept for scripts that import it


def _exact(amount: Decimal | str | int) -> Decimal:
    """An amount of credits as an exact decimal (sent as a JSON string, never a float)."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | str | int):
        raise InvalidInput(
            f"An amount of credits is a Decimal, a string or an int, not {type(amount).__name__} "
            f"{amount!r} (a binary float is not exact)."
        )
    try:
        return Decimal(amount.strip() if isinstance(amount, str) else amount)
    except ArithmeticError:
        raise InvalidInput(f"The amount {amount!r} is not a number of credits.") from None


def _window(since: datetime | None, until: datetime | None) -> dict[str, str]:
    """``since`` and ``until`` as ISO 8601 in UTC (a naive time is taken as UTC): the gateway
    compares them with the ledger's UTC times."""
    moments = {"since": since, "until": until}
    return {
        k: (v if v.tzinfo else v.replace(tzinfo=UTC)).astimezone(UTC).isoformat() for k, v in moments.items() if v is not None
    }


def _as_utc(moment: datetime | None) -> datetime | None:
    """A moment in UTC, a naive one taken as UTC (as the gateway takes it)."""
    return None if moment is None else (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


class ManagementClient(GatewayClient):
    """A provider's handle on the platform: ``ManagementClient(api_key, url=...)``.

    The URL is ``url=``, else ``CIPHERPOOL_URL``, else the local stack's (what `cipherpool up`
    wrote in the data directory); the key is ``api_key=`` or ``CIPHERPOOL_API_KEY``."""

    def __init__(self, api_key: str | None = None, url: str | None = None, *, settings: Settings | None = None):
        settings = client_settings(url, settings)
        super().__init__(api_key or settings.api_key, url, settings, "No API key: pass api_key= or set CIPHERPOOL_API_KEY.")
        self.api_key = self._t.credential

    # account
    def account(self) -> AccountOut:
        """This account's details."""
        return self._t.call("GET", "/v1/account", AccountOut)

    def update_account(
        self, *, name: str | None = None, organisation: str | None = UNSET, contact_email: str | None = UNSET
    ) -> AccountOut:
        """Change the details given (``None`` clears organisation or contact email)."""
        body = {
            k: v
            for k, v in {"name": name, "organisation": organisation, "contact_email": contact_email}.items()
            if v is not UNSET and not (k == "name" and v is None)
        }
        return self._t.call("PATCH", "/v1/account", AccountOut, json=AccountUpdate(**body).model_dump(exclude_unset=True))

    def rotate_api_key(self) -> str:
        """A new API key (shown once); the old one stops working at once. This client uses the new one."""
        rotated = self._t.call("POST", "/v1/account/api-key", ApiKeyRotated)
        self._t.set_credential(rotated.api_key)
        self.api_key = rotated.api_key
        return rotated.api_key

    # models
    def deploy_model(
        self,
        name: str,
        path: str | Path,
        hardware: str | None = None,
        *,
        description: str = "",
        min_workers: int = 0,
        max_workers: int = 1,
        shared: bool = False,
        node_selector: dict[str, str] | None = None,
    ) -> ModelDetail:
        """Upload a ``FHEModelDev(...).save()`` directory and register it as version 1 (not yet
        active). ``hardware``: its host class (None: the platform's default, the CPU).
        ``node_selector``: labels a pool node must carry to serve it."""
        client, server = self._upload(path)
        body = DeployIn(
            name=name,
            client_upload=client,
            server_upload=server,
            hardware=hardware or DeployIn.model_fields["hardware"].default,
            description=description,
            min_workers=min_workers,
            max_workers=max_workers,
            shared=shared,
            node_selector=node_selector or {},
        )
        return self._t.call("POST", "/v1/models", ModelDetail, json=body.model_dump())

    def list_models(self) -> list[ModelOut]:
        return self._t.call("GET", "/v1/models", list[ModelOut])

    def get_model(self, name: str) -> ModelDetail:
        """Settings, status, versions, serving artifact (digest, size, input shape), running workers."""
        return self._t.call("GET", self._model_path(name), ModelDetail)

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        hardware: str | None = None,
        min_workers: int | None = None,
        max_workers: int | None = None,
        shared: bool | None = None,
        node_selector: dict[str, str] | None = None,
    ) -> ModelDetail:
        """Change the settings given; the others stay (``node_selector={}`` clears it)."""
        body = ModelSettings(
            description=description,
            hardware=hardware,
            min_workers=min_workers,
            max_workers=max_workers,
            shared=shared,
            node_selector=node_selector,
        )
        return self._t.call("PATCH", self._model_path(name), ModelDetail, json=body.model_dump(exclude_none=True))

    def deploy_version(
        self, name: str, path: str | Path, note: str = "", *, wait: bool = False, timeout: float | None = None
    ) -> ModelDetail:
        """Upload a new version and roll it out: workers load it one at a time and keep
        answering; queries use it once every worker holds it. ``wait``: until then."""
        client, server = self._upload(path)
        body = VersionIn(client_upload=client, server_upload=server, note=note)
        model = self._t.call("POST", self._model_path(name) + "/versions", ModelDetail, json=body.model_dump())
        return self.wait_for_rollout(name, timeout) if wait else model

    def list_versions(self, name: str) -> list[VersionOut]:
        return self._t.call("GET", self._model_path(name) + "/versions", list[VersionOut])

    def rollback_model(
        self, name: str, version: int | None = None, *, wait: bool = False, timeout: float | None = None
    ) -> ModelDetail:
        """Serve an earlier version again (default: the one before the serving one)."""
        body = RollbackIn(version=version)
        model = self._t.call("POST", self._model_path(name) + "/rollback", ModelDetail, json=body.model_dump())
        return self.wait_for_rollout(name, timeout) if wait else model

    def wait_for_rollout(self, name: str, timeout: float | None = None) -> ModelDetail:
        """The model once no rollout is under way (or as it is at the timeout)."""
        latest = self.get_model(name)

        def done() -> ModelDetail | None:
            nonlocal latest
            latest = self.get_model(name)
            return latest if latest.rollout_version is None else None

        try:
            return wait_until(done, timeout or self.settings.worker_start_timeout_s, interval_s=POLL_S)
        except WaitTimeout:
            return latest

    def delete_model(self, name: str) -> None:
        """Delete the model, its versions, keys and events (refused while workers run)."""
        self._t.request("DELETE", self._model_path(name))

    def activate_model(self, name: str) -> ModelOut:
        return self._t.call("POST", self._model_path(name) + "/activate", ModelOut)

    def deactivate_model(self, name: str) -> ModelOut:
        return self._t.call("POST", self._model_path(name) + "/deactivate", ModelOut)

    def model_events(self, name: str, since: datetime | str | None = None, *, limit: int | None = None) -> list[EventOut]:
        """The model's event log, oldest first: all, or ``since`` a time (datetime) or after an
        event (its id, ``ev_…``, as ``follow`` uses it)."""
        params: dict[str, Any] = {}
        if isinstance(since, datetime):
            params["since"] = since.isoformat()
        elif since is not None:
            params["after"] = since
        if limit is not None:
            params["limit"] = limit
        return self._t.call("GET", self._model_path(name) + "/events", list[EventOut], params=params)

    def follow_events(
        self, name: str, since: datetime | str | None = None, *, poll_s: float = FOLLOW_POLL_S
    ) -> Iterator[EventOut]:
        """The model's events as they happen (forever; stop iterating to stop)."""
        cursor = since
        while True:
            batch = self.model_events(name, cursor)
            yield from batch
            if batch:
                cursor = batch[-1].id
            else:
                time.sleep(poll_s)

    # autoscaling
    def set_autoscale(
        self,
        model: str,
        *,
        target_queue_wait_s: float | None = UNSET,
        target_queue_depth: int | None = UNSET,
        scale_up_after_s: float | None = None,
        idle_after_s: float | None = None,
        cooldown_up_s: float | None = None,
        cooldown_down_s: float | None = None,
    ) -> AutoscaleOut:
        """Turn the model's autoscaling on, or change it (seconds throughout): beat adds a worker
        while the average queue wait or the queries waiting per worker stay above their target
        for ``scale_up_after_s``, and removes one after ``idle_after_s`` with no query, between
        the model's min and max workers. What is not given keeps its value (a new policy: the
        defaults); ``None`` for a target clears it (at least one must remain)."""
        given = {
            "target_queue_wait_s": target_queue_wait_s,
            "target_queue_depth": target_queue_depth,
            "scale_up_after_s": scale_up_after_s,
            "idle_after_s": idle_after_s,
            "cooldown_up_s": cooldown_up_s,
            "cooldown_down_s": cooldown_down_s,
        }
        body = AutoscaleIn(**{k: v for k, v in given.items() if v is not UNSET and (v is not None or "target" in k)})
        return self._t.call("PUT", self._model_path(model) + "/autoscale", AutoscaleOut, json=body.model_dump(exclude_unset=True))

    def get_autoscale(self, model: str) -> AutoscaleOut:
        """The model's autoscaling policy (``enabled`` false: off), its workers and bounds, and
        the autoscaler's latest decision with its reason (``last_action``, ``last_reason``)."""
        return self._t.call("GET", self._model_path(model) + "/autoscale", AutoscaleOut)

    def disable_autoscale(self, model: str) -> AutoscaleOut:
        """Turn the model's autoscaling off (its workers stay; the settings are kept)."""
        return self._t.call("DELETE", self._model_path(model) + "/autoscale", AutoscaleOut)

    # workers
    def start_worker(
        self, model: str, *, profile: str | None = None, standby: bool = False, wait: bool = True, timeout: float | None = None
    ) -> WorkerInfo:
        """Bind a free pool node to the model; returns once it serves (or is on standby), or
        raises why not (model not active, max_workers reached, no free node of its class)."""
        return self.start_workers(model, 1, profile=profile, standby=standby, wait=wait, timeout=timeout)[0]

    def start_workers(
        self,
        model: str,
        count: int = 1,
        *,
        profile: str | None = None,
        standby: bool = False,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[WorkerInfo]:
        """Start ``count`` workers (all or none), on nodes of ``profile`` if given; ``standby``:
        loaded, not consuming, until :meth:`resume_worker`. ``wait``: until each is up."""
        body = WorkerIn(model=model, count=count, profile=profile, standby=standby).model_dump()
        workers = self._t.call("POST", "/v1/workers", list[WorkerInfo], json=body)
        return [self._until_loaded(w, standby, timeout) for w in workers] if wait else workers

    def _until_loaded(self, worker: WorkerInfo, standby: bool, timeout: float | None) -> WorkerInfo:
        deadline = time.monotonic() + (timeout or self.settings.worker_start_timeout_s)
        worker = self._wait_while(worker, WorkerStatus.PENDING, max(0.001, deadline - time.monotonic()))
        worker = self._wait_while(worker, WorkerStatus.LOADING, max(0.001, deadline - time.monotonic()))
        expected = WorkerStatus.STANDBY if standby else WorkerStatus.UP
        if worker.status != expected:
            still_loading = worker.status in (WorkerStatus.PENDING, WorkerStatus.LOADING)
            reason = worker.error or ("still loading after the timeout" if still_loading else "no reason given")
            raise WorkerStartFailed(
                f"Worker {worker.id} for model {worker.model!r} on {worker.node} is {worker.status.value}: {reason}"
            )
        return worker

    def standby_worker(self, worker_id: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        """Stop consuming, keep the model loaded: :meth:`resume_worker` is instant."""
        worker = self._worker("POST", f"/v1/workers/{quote(worker_id, safe='')}/standby")
        return self._wait_while(worker, WorkerStatus.UP, timeout) if wait else worker

    def resume_worker(self, worker_id: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        worker = self._worker("POST", f"/v1/workers/{quote(worker_id, safe='')}/resume")
        return self._wait_while(worker, WorkerStatus.STANDBY, timeout) if wait else worker

    def worker_logs(self, worker_id: str, after: int = -1) -> list[WorkerLogLine]:
        """The worker's log lines after line ``after`` (load, errors, standby, stop)."""
        return self._t.call("GET", f"/v1/workers/{quote(worker_id, safe='')}/logs", list[WorkerLogLine], params={"after": after})

    def list_nodes(self) -> list[NodeOut]:
        """The pool's nodes: profile, class, labels, capacity and allocatable, status; the
        model and worker where they are this account's."""
        return self._t.call("GET", "/v1/nodes", list[NodeOut])

    def stop_worker(self, worker_id: str, *, wait: bool = True, timeout: float | None = None) -> WorkerInfo:
        worker = self._worker("POST", f"/v1/workers/{quote(worker_id, safe='')}/stop")
        return self._wait_while(worker, WorkerStatus.STOPPING, timeout) if wait else worker

    def get_worker(self, worker_id: str) -> WorkerInfo:
        return self._worker("GET", f"/v1/workers/{quote(worker_id, safe='')}")

    def list_workers(self, model: str | None = None) -> list[WorkerInfo]:
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/workers", list[WorkerOut], params=params)

    def worker_stats(self, model: str | None = None) -> list[WorkerStats]:
        """Live figures of each running worker: its own query counts and times (this binding
        only) and its model's key cache on the node. ``node_lifetime`` is None: a node's
        lifetime figures count other accounts' work (the operator's
        ``GET /v1/platform/nodes/{node}/stats`` has them)."""
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/workers/stats", list[WorkerStats], params=params)

    def model_stats(self, model: str | None = None, *, window_s: int | None = None, last: int | None = None) -> list[ModelStats]:
        """Query figures per model and per worker of it: average query time over ``window_s``
        (whole minutes; the gateway's default if None) and all-time, current query time (the
        ``last`` latest queries), queue wait apart from compute, queries per minute, error and
        refusal rates, queue depth and workers by status. Read from recorded times: no node is
        asked, so it is cheap enough to poll every second."""
        params: dict[str, str | int] = {}
        if model:
            params["model"] = model
        if window_s is not None:
            params["window_s"] = window_s
        if last is not None:
            params["last"] = last
        return self._t.call("GET", "/v1/stats", list[ModelStats], params=params or None)

    # tokens
    def new_token(
        self,
        name: str,
        model: str | None = None,
        *,
        models: list[str] | None = None,
        ttl_s: float | None = None,
        expires_at: datetime | None = None,
        no_expiry: bool = False,
        quota: int | None = None,
    ) -> TokenCreated:
        """A new access token (its value in ``.token``, shown only now), assigned to ``model``
        and/or ``models``; expires in 30 days unless ``ttl_s``, ``expires_at`` or ``no_expiry``."""
        body = TokenIn(
            name=name, model=model, models=models or [], ttl_s=ttl_s, expires_at=expires_at, no_expiry=no_expiry, quota=quota
        )
        return self._t.call("POST", "/v1/tokens", TokenCreated, json=body.model_dump(mode="json"))

    def create_token(self, name: str, model: str | None = None, ttl_s: float | None = None, **options: Any) -> str:
        """:meth:`new_token`, returning only the value (shown only now)."""
        return self.new_token(name, model, ttl_s=ttl_s, **options).token

    def get_token(self, token_id: str) -> TokenOut:
        return self._t.call("GET", self._token_path(token_id), TokenOut)

    def list_tokens(self, model: str | None = None) -> list[TokenOut]:
        """Masked, with status, models, expiry, last use and queries used."""
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/tokens", list[TokenOut], params=params)

    def update_token(
        self,
        token_id: str,
        *,
        name: str | None = None,
        expires_at: datetime | None = UNSET,
        ttl_s: float | None = None,
        quota: int | None = UNSET,
        enabled: bool | None = None,
    ) -> TokenOut:
        """Change what is given: ``expires_at=None`` never expires, ``quota=None`` no quota;
        ``enabled=False`` disables it until ``enabled=True``."""
        body: dict[str, Any] = {"name": name, "ttl_s": ttl_s, "enabled": enabled}
        body = {k: v for k, v in body.items() if v is not None}
        if expires_at is not UNSET:
            body["expires_at"] = expires_at
        if quota is not UNSET:
            body["quota"] = quota
        update = TokenUpdate(**body)
        return self._t.call(
            "PATCH", self._token_path(token_id), TokenOut, json=update.model_dump(mode="json", include=update.model_fields_set)
        )

    def enable_token(self, token_id: str) -> TokenOut:
        return self.update_token(token_id, enabled=True)

    def disable_token(self, token_id: str) -> TokenOut:
        return self.update_token(token_id, enabled=False)

    def assign_token(self, token_id: str, model: str) -> TokenOut:
        return self._t.call("POST", self._token_path(token_id) + "/models", TokenOut, json=AssignIn(model=model).model_dump())

    def unassign_token(self, token_id: str, model: str) -> TokenOut:
        return self._t.call("DELETE", f"{self._token_path(token_id)}/models/{quote(model, safe='')}", TokenOut)

    def revoke_token(self, token_id: str) -> TokenOut:
        return self._t.call("POST", self._token_path(token_id) + "/revoke", TokenOut)

    def delete_token(self, token_id: str) -> None:
        self._t.request("DELETE", self._token_path(token_id))

    # credits
    def credits(self) -> CreditBalance:
        """The balance (the sum of this account's ledger), whether it is low, the burn rate now
        and when the balance runs out at that rate: what to check before starting workers."""
        return self._t.call("GET", "/v1/credits", CreditBalance)

    def buy_credits(self, amount: Decimal | str | int, *, idempotency_key: str | None = None, note: str = "") -> PurchaseOut:
        """Buy ``amount`` credits through the platform's payment provider (by default an invoice
        to pay offline, credited at once); the answer holds the invoice or payment reference.

        Give an ``idempotency_key`` to retry safely: a purchase retried with the same key (after
        a timeout, say) credits nothing twice. ``amount`` is exact (a ``Decimal``, a string or an
        int, at most six decimals): a binary float is refused, since 0.1 is not 0.1 in binary."""
        body = PurchaseIn(amount=_exact(amount), idempotency_key=idempotency_key, note=note)
        return self._t.call("POST", "/v1/credits/purchases", PurchaseOut, json=body.model_dump(mode="json", exclude_none=True))

    def credit_history(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Iterable[LedgerKind | str] | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[LedgerLine]:
        """Ledger lines recorded in ``[since, until)``, oldest first, of the ``kinds`` given (all
        if none) and of ``model``: every credit and charge, each with the balance after it, so
        that a statement can be checked line by line. Without ``since``, from the first line."""
        params: dict[str, Any] = {"limit": limit, **_window(since, until)}
        if kinds:
            params["kind"] = [LedgerKind(k).value for k in kinds]
        if model:
            params["model"] = model
        return self._t.call("GET", "/v1/credits/history", list[LedgerLine], params=params)

    def credit_usage(self, *, since: datetime | None = None, until: datetime | None = None, model: str | None = None) -> UsageOut:
        """Runtime, cost and queries per day, model, worker and kind in ``[since, until)``
        (default: the last 30 days), with totals, the burn rate and when the balance runs out:
        what the credits were spent on."""
        params: dict[str, Any] = _window(since, until)
        if model:
            params["model"] = model
        return self._t.call("GET", "/v1/credits/usage", UsageOut, params=params)

    def credit_report(self, period: str) -> ReportOut:
        """A month's report (``period="2026-11"``) for accounting: its usage rows, opening and
        closing balances, credits in and charges per kind, and whether it reconciles to the
        ledger to the micro-credit."""
        return self._t.call("GET", "/v1/credits/report", ReportOut, params={"period": period})

    # alerts
    def set_alert(
        self,
        model: str,
        metric: AlertMetric | str,
        threshold: float,
        *,
        window_s: int | None = None,
        webhook_url: str | None = UNSET,
        new_secret: bool = False,
    ) -> AlertSet:
        """Alert when the model's ``metric`` (an :class:`AlertMetric`) goes above ``threshold``
        over ``window_s`` seconds; the model's rule for that metric is replaced if it has one
        (what is not given stays). ``webhook_url`` is called, signed, when it fires and
        clears (``None`` removes it); a new webhook's secret is in ``.webhook_secret``, shown
        only now (``new_secret=True`` makes another)."""
        body: dict[str, Any] = {"model": model, "metric": metric, "threshold": threshold, "new_secret": new_secret}
        if window_s is not None:
            body["window_s"] = window_s
        if webhook_url is not UNSET:
            body["webhook_url"] = webhook_url
        wire = AlertIn(**body)
        return self._t.call("PUT", "/v1/alerts", AlertSet, json=wire.model_dump(mode="json", include=wire.model_fields_set))

    def list_alerts(self, model: str | None = None) -> list[AlertOut]:
        """The account's alert rules (of ``model``), with their state and last figure."""
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/alerts", list[AlertOut], params=params)

    def remove_alert(self, alert_id: str) -> None:
        """Delete a rule; its events stay in :meth:`alert_events`."""
        self._t.request("DELETE", f"/v1/alerts/{quote(alert_id, safe='')}")

    def alert_events(self, model: str | None = None, *, limit: int = 100) -> list[AlertEventOut]:
        """The latest alerts fired and cleared (of ``model``), oldest first, with how each
        webhook call went (``delivery``, ``attempts``, ``last_error``)."""
        params: dict[str, Any] = {"limit": limit, **({"model": model} if model else {})}
        return self._t.call("GET", "/v1/alerts/events", list[AlertEventOut], params=params)

    # schedules
    def create_schedule(
        self,
        model: str,
        *,
        start_cron: str | None = None,
        stop_cron: str | None = None,
        timezone: str = "UTC",
        starts_at: datetime | None = None,
        ends_at: datetime | None = None,
        workers: int = 1,
        profile: str | None = None,
        name: str | None = None,
    ) -> ScheduleOut:
        """Keep ``workers`` workers of the model running in each window of the schedule: from
        each ``start_cron`` to the next ``stop_cron`` (five-field cron expressions read on the
        wall clock of ``timezone``, e.g. ``"0 8 * * 1-5"``, ``"0 20 * * 1-5"``,
        ``"Europe/Paris"``), or once from ``starts_at`` to ``ends_at`` (a reservation; a naive
        time is UTC). Beat starts and stops them; a window open now starts on its next tick."""
        body = ScheduleIn(
            model=model,
            name=name,
            start_cron=start_cron,
            stop_cron=stop_cron,
            timezone=timezone,
            starts_at=_as_utc(starts_at),
            ends_at=_as_utc(ends_at),
            workers=workers,
            profile=profile,
        )
        return self._t.call("POST", "/v1/schedules", ScheduleOut, json=body.model_dump(mode="json", exclude_none=True))

    def reserve_workers(
        self,
        model: str,
        starts_at: datetime,
        ends_at: datetime,
        workers: int = 1,
        *,
        profile: str | None = None,
        name: str | None = None,
    ) -> ScheduleOut:
        """A one-off reservation: ``workers`` workers from ``starts_at`` to ``ends_at``."""
        return self.create_schedule(model, starts_at=starts_at, ends_at=ends_at, workers=workers, profile=profile, name=name)

    def list_schedules(self, model: str | None = None) -> list[ScheduleOut]:
        """This account's schedules (of ``model``), each with the window open now, its next start
        and stop, its running workers and its last actions."""
        params = {"model": model} if model else None
        return self._t.call("GET", "/v1/schedules", list[ScheduleOut], params=params)

    def get_schedule(self, schedule_id: str) -> ScheduleOut:
        return self._t.call("GET", self._schedule_path(schedule_id), ScheduleOut)

    def pause_schedule(self, schedule_id: str) -> ScheduleOut:
        """Start nothing more; its workers are stopped on beat's next tick."""
        return self._t.call("POST", self._schedule_path(schedule_id) + "/pause", ScheduleOut)

    def resume_schedule(self, schedule_id: str) -> ScheduleOut:
        """Apply the schedule again; a window open now starts on beat's next tick."""
        return self._t.call("POST", self._schedule_path(schedule_id) + "/resume", ScheduleOut)

    def remove_schedule(self, schedule_id: str) -> None:
        """Delete the schedule and stop its workers now."""
        self._t.request("DELETE", self._schedule_path(schedule_id))

    @staticmethod
    def _schedule_path(schedule_id: str) -> str:
        return f"/v1/schedules/{quote(schedule_id, safe='')}"

    def _upload(self, path: str | Path) -> tuple[str, str]:
        """Stage a deployment directory's client.zip and server.zip; their upload ids."""
        deployment = load_deployment(path)
        client, server = (
            self._t.call(
                "PUT",
                "/v1/uploads",
                UploadOut,
                content=data,
                timeout=UPLOAD_TIMEOUT_S,
                headers={"Content-Type": "application/octet-stream"},
            )
            for data in (deployment.client_zip, deployment.server_zip)
        )
        return client.upload_id, server.upload_id

    @staticmethod
    def _model_path(name: str) -> str:
        return f"/v1/models/{quote(name, safe='')}"

    @staticmethod
    def _token_path(token_id: str) -> str:
        return f"/v1/tokens/{quote(token_id, safe='')}"

    def _worker(self, method: str, path: str, **kwargs: Any) -> WorkerInfo:
        return self._t.call(method, path, WorkerOut, **kwargs)

    def _wait_while(self, worker: WorkerInfo, status: WorkerStatus, timeout: float | None) -> WorkerInfo:
        """The worker once its status is no longer ``status``, or as last seen at the timeout
        (the caller tells the user what a worker still in ``status`` means)."""
        latest = worker

        def moved_on() -> WorkerInfo | None:
            nonlocal latest
            if latest.status == status:
                latest = self.get_worker(worker.id)
            return latest if latest.status != status else None

        try:
            return wait_until(moved_on, timeout or self.settings.worker_start_timeout_s, interval_s=POLL_S)
        except WaitTimeout:
            return latest
