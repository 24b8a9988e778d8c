"""Performance alerts, unit tier: rule validation, the webhook signature, the figures a rule
compares (recorded by the real node hook into a real Redis, with a fixed clock), firing and
clearing, the compare-and-set that keeps two evaluations from firing twice, the destination
check, and the webhook's retry schedule (an httpx MockTransport, and a real local receiver
behind the Celery task).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from cipherpool.alerts import destination, rules, signature, webhook
from cipherpool.config.settings import Settings
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, AlertEvent, AlertRule, Model, ModelEvent
from cipherpool.errors import AlertNotFound, InvalidInput, ModelNotFound, RefusedDestination, TooManyAlerts
from cipherpool.monitoring import timings
from cipherpool.scheduler.alerts import Seen, evaluate_all, measure, state_for, transition
from cipherpool.statuses import AlertMetric, AlertState, EventKind, WebhookDelivery
from cipherpool.workers.hooks import BindingEvent, QueryEvent
from cipherpool.workers.timings import QueryTimings
from tests.helpers import own_redis
from tests.webhook_receiver import Receiver

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC, a minute boundary
HOOK = "https://hooks.example.com/cipherpool"
A, C, Q, E, D = (
    AlertMetric.AVERAGE_QUERY_S,
    AlertMetric.CURRENT_QUERY_S,
    AlertMetric.QUEUE_WAIT_S,
    AlertMetric.ERROR_RATE,
    AlertMetric.QUEUE_DEPTH,
)


def provider(session: Session, *names: str) -> tuple[Account, dict[str, Model]]:
    """A fresh account with models of these names."""
    from cipherpool.fhe.deployment import Versions
    from cipherpool.services import accounts, models

    account, _key = accounts.create_account(session, f"alerts-{uuid.uuid4().hex[:8]}")
    made = {
        name: models.deploy_model(
            session, account, name, models.Artifact("c" * 64, "s" * 64, 100, 200, Versions("1", "1", "3.11"))
        )
        for name in names
    }
    return account, made


# ---- rules: validation, replacement, tenancy -----------------------------------------------


def test_a_new_rule_takes_the_default_window_and_no_webhook(session: Session):
    account, _ = provider(session, "m")
    done = rules.set_rule(session, account, "m", "average_query_s", 2.5, default_window_s=600)
    assert done.created and done.secret is None
    rule = done.rule
    assert (rule.metric, rule.threshold, rule.window_s, rule.state, rule.webhook_url) == ("average_query_s", 2.5, 600, "ok", None)
    assert [r.id for r, name in rules.list_rules(session, account)] == [rule.id]


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> Iterator[str]:
    """One SQLite database for the validation tables (each case has an account of its own):
    the checks come before any SQL, so one engine is enough and saves a migration per case."""
    from cipherpool.db import get_engine, init_db

    url = f"sqlite:///{tmp_path_factory.mktemp('alerts-db') / 'db.sqlite'}"
    init_db(url)
    yield url
    get_engine(url).dispose()


@pytest.fixture
def quick(shared_db: str) -> Iterator[Session]:
    from cipherpool.db import session_scope

    with session_scope(shared_db) as s:
        yield s


@pytest.mark.parametrize(
    ("metric", "threshold", "options", "match"),
    [
        ("average_query_s", -0.1, {}, "0 or more"),
        ("queue_depth", -1, {}, "0 or more"),
        ("average_query_s", float("nan"), {}, "finite"),
        ("queue_wait_s", float("inf"), {}, "finite"),
        ("current_query_s", True, {}, "finite"),
        ("error_rate", 1.01, {}, "between 0 and 1"),
        ("average_query_s", 1, {"window_s": 59}, "60 to 86400"),
        ("average_query_s", 1, {"window_s": 86_401}, "60 to 86400"),
        ("average_query_s", 1, {"window_s": 90.5}, "60 to 86400"),
        ("p99_query_s", 1, {}, "Unknown alert metric"),
        ("average_query_s", 1, {"webhook_url": "ftp://hooks.example.com/x"}, "http:// or https://"),
        ("average_query_s", 1, {"webhook_url": "https:///no-host"}, "http:// or https://"),
        ("average_query_s", 1, {"webhook_url": "hooks.example.com/x"}, "http:// or https://"),
        ("average_query_s", 1, {"webhook_url": "https://user:pw@hooks.example.com/"}, "no user or password"),
        ("average_query_s", 1, {"webhook_url": "https://hooks.example.com/a b"}, "no spaces"),
        ("average_query_s", 1, {"webhook_url": "https://hooks.example.com:99999/"}, "Invalid webhook URL"),
        ("average_query_s", 1, {"webhook_url": "http://127.0.0.1:8080/hook"}, "not a public address"),
        ("average_query_s", 1, {"webhook_url": "http://10.0.0.7/hook"}, "not a public address"),
        ("average_query_s", 1, {"webhook_url": "http://169.254.169.254/latest/meta-data"}, "not a public address"),
        ("average_query_s", 1, {"webhook_url": "http://[::1]/hook"}, "not a public address"),
        ("average_query_s", 1, {"webhook_url": "http://localhost:9000/hook"}, "own host"),
        ("average_query_s", 1, {"new_secret": True}, "no webhook"),
    ],
)
def test_invalid_rules_are_refused(quick: Session, metric: str, threshold: Any, options: dict[str, Any], match: str):
    account, _ = provider(quick, "m")
    with pytest.raises(InvalidInput, match=match):
        rules.set_rule(quick, account, "m", metric, threshold, **options)
    assert rules.list_rules(quick, account) == []


@pytest.mark.parametrize(
    ("metric", "threshold"), [("error_rate", 0), ("error_rate", 1), ("queue_depth", 0), ("average_query_s", 1e6)]
)
def test_edge_thresholds_are_accepted(quick: Session, metric: str, threshold: float):
    account, _ = provider(quick, "m")
    assert rules.set_rule(quick, account, "m", metric, threshold).rule.threshold == threshold


def test_a_private_webhook_is_accepted_where_the_platform_allows_it(session: Session):
    account, _ = provider(session, "m")
    done = rules.set_rule(session, account, "m", "error_rate", 0.1, webhook_url="http://127.0.0.1:8080/hook", allow_private=True)
    assert done.rule.webhook_url == "http://127.0.0.1:8080/hook" and done.secret


def test_setting_a_metric_again_replaces_its_rule(session: Session):
    account, models = provider(session, "m")
    first = rules.set_rule(session, account, "m", "average_query_s", 1.0, window_s=120, webhook_url=HOOK)
    assert first.created and first.secret and len(first.secret) >= 43
    first.rule.state = AlertState.FIRING.value  # as an evaluation left it
    session.flush()

    # Given a new threshold only, the window, webhook, secret and state stay: no secret shown.
    again = rules.set_rule(session, account, "m", "average_query_s", 5.0)
    assert (again.created, again.secret, again.rule.id) == (False, None, first.rule.id)
    assert (again.rule.threshold, again.rule.window_s, again.rule.webhook_url, again.rule.state) == (5.0, 120, HOOK, "firing")
    assert again.rule.webhook_secret == first.secret
    # The same URL keeps its secret; a new URL, or new_secret, makes a new one.
    assert rules.set_rule(session, account, "m", "average_query_s", 5.0, webhook_url=HOOK).secret is None
    other = rules.set_rule(session, account, "m", "average_query_s", 5.0, webhook_url=HOOK + "/v2").secret
    assert other and other != first.secret
    rotated = rules.set_rule(session, account, "m", "average_query_s", 5.0, new_secret=True).secret
    assert rotated and rotated not in (first.secret, other)
    # None removes the webhook; another metric is another rule.
    gone = rules.set_rule(session, account, "m", "average_query_s", 5.0, webhook_url=None).rule
    assert (gone.webhook_url, gone.webhook_secret) == (None, None)
    rules.set_rule(session, account, "m", "queue_depth", 10)
    rows = session.exec(select(AlertRule).where(AlertRule.model_id == models["m"].id)).all()
    assert sorted(r.metric for r in rows) == ["average_query_s", "queue_depth"]


def test_another_accounts_model_and_rule_are_not_found(session: Session):
    alice, _ = provider(session, "a")
    bob, _ = provider(session, "b")
    bobs = rules.set_rule(session, bob, "b", "error_rate", 0.5).rule
    with pytest.raises(ModelNotFound):
        rules.set_rule(session, alice, "b", "error_rate", 0.9)
    with pytest.raises(ModelNotFound):
        rules.list_rules(session, alice, "b")
    with pytest.raises(ModelNotFound):
        rules.list_events(session, alice, "b")
    with pytest.raises(AlertNotFound, match=bobs.id):
        rules.remove_rule(session, alice, bobs.id)
    assert rules.list_rules(session, alice) == [] and rules.list_events(session, alice) == []
    assert session.get(AlertRule, bobs.id).threshold == 0.5


def test_an_account_has_at_most_so_many_rules(session: Session, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rules, "MAX_RULES_PER_ACCOUNT", 2)
    account, _ = provider(session, "m", "n")
    rules.set_rule(session, account, "m", "error_rate", 0.1)
    rules.set_rule(session, account, "m", "queue_depth", 5)
    with pytest.raises(TooManyAlerts, match="remove one first"):
        rules.set_rule(session, account, "n", "error_rate", 0.1)
    rules.set_rule(session, account, "m", "queue_depth", 50)  # replacing one is no new rule
    assert len(rules.list_rules(session, account)) == 2


def test_events_outlive_their_rule_and_go_with_their_model(session: Session):
    from cipherpool.services import models as model_service

    account, models = provider(session, "m")
    rule = rules.set_rule(session, account, "m", "average_query_s", 1.0).rule
    event = transition(session, Seen.of(rule, models["m"]), 3.0, datetime.now(UTC))
    assert event is not None
    rules.remove_rule(session, account, rule.id)
    assert [e.id for e, name in rules.list_events(session, account, "m")] == [event.id]
    rules.set_rule(session, account, "m", "queue_depth", 1)
    model_service.delete_model(session, account, "m")
    assert session.exec(select(AlertEvent).where(AlertEvent.account_id == account.id)).all() == []
    assert session.exec(select(AlertRule).where(AlertRule.account_id == account.id)).all() == []


# ---- the signature -----------------------------------------------------------------------


BODY = b'{"event_id":1,"kind":"fired"}'


def test_a_signed_body_verifies_and_the_format_is_hmac_of_t_dot_body():
    header = signature.sign("s3cret", BODY, timestamp=1_767_225_600)
    expected = hmac.new(b"s3cret", b"1767225600." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1767225600,v1={expected}"
    assert signature.verify("s3cret", header, BODY, tolerance_s=300, now=1_767_225_600 + 299)
    # A receiver that checks two signatures (a secret being rotated) accepts either.
    assert signature.verify("s3cret", f"t=1767225600,v1={'0' * 64},v1={expected}", BODY, now=1_767_225_600)


@pytest.mark.parametrize(
    ("secret", "header", "body", "now"),
    [
        ("s3cret", "SIGNED", BODY.replace(b"fired", b"cleared"), T0),  # tampered body
        ("other", "SIGNED", BODY, T0),  # wrong secret
        ("s3cret", "SIGNED", BODY, T0 + 301),  # too old: a replay
        ("s3cret", "SIGNED", BODY, T0 - 301),  # from the future
        ("s3cret", None, BODY, T0),
        ("s3cret", "", BODY, T0),
        ("s3cret", "garbage", BODY, T0),
        ("s3cret", "t=abc,v1=00", BODY, T0),
        ("s3cret", f"t={int(T0)}", BODY, T0),
        ("s3cret", f"t={int(T0)},v0=00", BODY, T0),
        ("s3cret", f"t={int(T0)},v1=é", BODY, T0),
    ],
)
def test_a_signature_that_does_not_match_fails(secret: str, header: str | None, body: bytes, now: float):
    if header == "SIGNED":
        header = signature.sign("s3cret", BODY, timestamp=int(T0))
    assert signature.verify(secret, header, body, tolerance_s=300, now=now) is False


def test_a_receiver_imports_the_signature_without_the_platforms_server_side():
    import subprocess
    import sys

    code = (
        "import sys; from cipherpool.alerts.signature import verify; print(sorted(m for m in ('sqlmodel', "
        "'sqlalchemy', 'celery', 'kombu', 'redis', 'fastapi', 'concrete', 'torch', 'cipherpool.db') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


# ---- the figures a rule compares -----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "alerts-redis") as url:
        yield url


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    redis: Any, model_id: str, clock: Clock, at: float, wait: float = 0.0, compute: float = 0.0, outcome: str = "computed"
) -> None:
    """One query of ``model_id`` through the real node hook, at ``at``."""
    from cipherpool.errors import MalformedCiphertext

    clock.now = at
    hook = QueryTimings(lambda: redis, clock)
    query = QueryEvent("node-1@test", uuid.uuid4().hex, BindingEvent("node-1@test", "w1", model_id, "m"), model_id=model_id)
    query.timings.update(queue_wait_s=wait, compute_s=compute)
    if outcome == "computed":
        hook.query_computed(query)
    elif outcome == "refused":
        hook.query_refused(query, MalformedCiphertext("bad"))
    else:
        hook.query_failed(query, RuntimeError("boom"))


@pytest.fixture
def recorded(redis_url: str) -> Iterator[tuple[Any, str]]:
    """A model with three computed queries (2 s, 4 s, 2 s), one refused, one failed, in the
    first minute after T0."""
    import redis

    client = redis.Redis.from_url(redis_url)
    model_id, clock = uuid.uuid4().hex[:16], Clock()
    for at, wait, compute in [(T0 + 10, 0.5, 1.5), (T0 + 20, 1.0, 3.0), (T0 + 30, 0.0, 2.0)]:
        record(client, model_id, clock, at, wait, compute)
    record(client, model_id, clock, T0 + 40, outcome="refused")
    record(client, model_id, clock, T0 + 50, outcome="failed")
    yield client, model_id
    client.close()


@pytest.mark.parametrize(
    ("metric", "window_s", "now", "recent", "expected"),
    [
        (A, 300, T0 + 60, 20, 8 / 3),  # (2 + 4 + 2) / 3
        (Q, 300, T0 + 60, 20, 0.5),  # (0.5 + 1 + 0) / 3
        (E, 300, T0 + 60, 20, 0.25),  # 1 failed of 4 runs (3 computed, 1 failed): the caller's refusal is apart
        (C, 300, T0 + 60, 20, 8 / 3),  # the latest 20: all three
        (C, 300, T0 + 60, 2, 3.0),  # the latest 2: 2 s and 4 s
        (C, 60, T0 + 75, 20, 3.0),  # within the last 60 s: since T0 + 15, the 4 s and 2 s queries
        (A, 60, T0 + 75, 20, 8 / 3),  # the window's whole minutes still hold all three
        (A, 60, T0 + 125, 20, None),  # minutes 1 and 2 after T0: nothing computed
        (Q, 60, T0 + 125, 20, None),
        (E, 60, T0 + 125, 20, None),
        (C, 60, T0 + 125, 20, None),
        (A, 3600, T0 + 3000, 20, 8 / 3),
    ],
)
def test_each_metric_from_recorded_timings(
    recorded: tuple[Any, str], metric: AlertMetric, window_s: int, now: float, recent: int, expected: float | None
):
    redis, model_id = recorded
    figures = timings.read(redis, model_id, window_s, now)
    value = measure(metric, figures, recent=recent, now=now)
    assert value == (pytest.approx(expected) if expected is not None else None)


def test_queue_depth_is_the_depth_given():
    assert measure(D, None, recent=20, depth=7) == 7.0
    assert measure(D, None, recent=20, depth=0) == 0.0


@pytest.mark.parametrize(
    ("value", "threshold", "state"),
    [
        (None, 0.0, AlertState.OK),
        (0.0, 0.0, AlertState.OK),
        (1e-9, 0.0, AlertState.FIRING),
        (1.0, 1.0, AlertState.OK),
        (1.5, 1.0, AlertState.FIRING),
        (0.99, 1.0, AlertState.OK),
    ],
)
def test_a_rule_fires_above_its_threshold_only(value: float | None, threshold: float, state: AlertState):
    assert state_for(value, threshold) is state


# ---- firing and clearing -------------------------------------------------------------------


def _seen(session: Session, rule_id: str) -> Seen:
    rule = session.get(AlertRule, rule_id)
    session.refresh(rule)
    return Seen.of(rule, session.get(Model, rule.model_id))


def test_an_alert_fires_once_and_clears_once(session: Session):
    account, models = provider(session, "m")
    rule_id = rules.set_rule(session, account, "m", "average_query_s", 1.0, webhook_url=HOOK).rule.id
    now = datetime.now(UTC)

    # Below: nothing recorded but the figure.
    assert transition(session, _seen(session, rule_id), 0.5, now) is None
    # Above: fired, once, with a pending webhook call and a model event.
    fired = transition(session, _seen(session, rule_id), 2.5, now)
    assert (fired.kind, fired.value, fired.threshold, fired.delivery) == ("fired", 2.5, 1.0, "pending")
    assert transition(session, _seen(session, rule_id), 3.5, now) is None  # still above: no new event
    assert (session.get(AlertRule, rule_id).state, session.get(AlertRule, rule_id).value) == ("firing", 3.5)
    # Back to the threshold: cleared.
    cleared = transition(session, _seen(session, rule_id), 1.0, now)
    assert (cleared.kind, cleared.value) == ("cleared", 1.0)
    assert transition(session, _seen(session, rule_id), None, now) is None  # no data while ok: nothing
    assert session.get(AlertRule, rule_id).state == "ok"

    kinds = [e.kind for e in session.exec(select(ModelEvent).where(ModelEvent.model_id == models["m"].id))]
    assert kinds[-2:] == [EventKind.ALERT_FIRED.value, EventKind.ALERT_CLEARED.value]
    messages = [e.message for e in session.exec(select(ModelEvent).where(ModelEvent.model_id == models["m"].id))]
    assert "alert average_query_s fired: 2.5 > 1" in messages[-2] and "1 <= 1" in messages[-1]


def test_no_query_in_the_window_clears_a_firing_alert(session: Session):
    account, _ = provider(session, "m")
    rule_id = rules.set_rule(session, account, "m", "error_rate", 0.1).rule.id
    transition(session, _seen(session, rule_id), 0.5, datetime.now(UTC))
    cleared = transition(session, _seen(session, rule_id), None, datetime.now(UTC))
    assert (cleared.kind, cleared.value, cleared.delivery) == ("cleared", None, "none")


def test_two_evaluations_of_one_reading_record_one_event(session: Session):
    account, _ = provider(session, "m")
    rule_id = rules.set_rule(session, account, "m", "queue_depth", 3).rule.id
    now = datetime.now(UTC)
    # Given two evaluations that both read the rule while it was ok,
    first, second = _seen(session, rule_id), _seen(session, rule_id)
    # when both see the figure above the threshold, only the first to update fires it.
    assert transition(session, first, 9, now) is not None
    assert transition(session, second, 9, now) is None
    # And the same for clearing.
    first, second = _seen(session, rule_id), _seen(session, rule_id)
    assert transition(session, first, 0, now) is not None
    assert transition(session, second, 0, now) is None
    kinds = [e.kind for e in session.exec(select(AlertEvent).where(AlertEvent.rule_id == rule_id))]
    assert kinds == ["fired", "cleared"]


def test_a_reading_of_a_rule_set_again_meanwhile_is_left_to_the_next_round(session: Session):
    account, _ = provider(session, "m")
    rule_id = rules.set_rule(session, account, "m", "average_query_s", 1.0).rule.id
    stale = _seen(session, rule_id)
    rules.set_rule(session, account, "m", "average_query_s", 10.0)
    assert transition(session, stale, 5.0, datetime.now(UTC)) is None  # 5 > 1, but the threshold is 10 now
    rule = session.get(AlertRule, rule_id)
    assert (rule.state, rule.threshold) == ("ok", 10.0)


# ---- beat's round --------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path, redis_url: str, migrated_sqlite) -> Iterator[PlatformContext]:
    """A platform of its own: a fresh SQLite database (a copy of the session's migrated
    template, its engine disposed after: tests/conftest.py), the module's Redis."""
    settings = Settings(
        data_dir=tmp_path / "data",
        broker_url=redis_url,
        webhook_allow_private=True,
        webhook_backoff_s=2.0,
        webhook_attempts=3,
        stats_recent=20,
    )
    context = PlatformContext(settings)
    migrated_sqlite(context.db_url)
    yield context
    context.store.redis.close()


@pytest.fixture
def celery_app(ctx: PlatformContext) -> Any:
    from cipherpool.config.celery import create_app

    return create_app(ctx.settings)


class Queued:
    """Stands in for queueing the webhook task: records the event ids (or refuses them all)."""

    def __init__(self, accept: bool = True):
        self.ids: list[int] = []
        self.accept = accept

    def __call__(self, _app: Any, event_id: int) -> bool:
        self.ids.append(event_id)
        return self.accept


def test_a_round_fires_on_recorded_timings_and_clears_when_they_age_out(ctx: PlatformContext, celery_app: Any):
    with ctx.session() as session:
        account, models = provider(session, "m")
        model_id = models["m"].id
        with_hook = rules.set_rule(session, account, "m", "average_query_s", 1.0, window_s=60, webhook_url=HOOK).rule.id
        plain = rules.set_rule(session, account, "m", "error_rate", 0.5, window_s=60).rule.id
    clock = Clock()
    record(ctx.store.redis, model_id, clock, T0 + 5, wait=0.5, compute=2.0)

    queued = Queued()
    report = evaluate_all(ctx, celery_app, now=T0 + 10, queue=queued)
    assert (report.rules, len(report.fired), report.cleared, report.errors) == (2, 1, [], [])
    assert queued.ids == report.fired == report.queued  # the rule with a webhook only
    with ctx.session() as session:
        event = session.get(AlertEvent, report.fired[0])
        assert (event.rule_id, event.kind, event.value, event.delivery) == (with_hook, "fired", 2.5, "pending")
        assert session.get(AlertRule, plain).value == 0.0  # evaluated: no failure among one query

    # The same figures again: nothing new. Two minutes on, no query in the window: cleared.
    assert evaluate_all(ctx, celery_app, now=T0 + 20, queue=queued).fired == []
    later = evaluate_all(ctx, celery_app, now=T0 + 180, queue=queued)
    assert (later.fired, len(later.cleared)) == ([], 1) and queued.ids == report.fired + later.cleared
    with ctx.session() as session:
        assert session.get(AlertEvent, later.cleared[0]).value is None


def test_a_queue_depth_rule_reads_the_broker(ctx: PlatformContext, celery_app: Any):
    from cipherpool.names import model_queue

    with ctx.session() as session:
        account, models = provider(session, "m")
        rule_id = rules.set_rule(session, account, "m", "queue_depth", 2).rule.id
        queue = model_queue(models["m"].hardware, models["m"].id)
    ctx.store.redis.lpush(queue, *[json.dumps({"n": i}) for i in range(3)])  # three queries waiting
    try:
        report = evaluate_all(ctx, celery_app, queue=Queued())
        assert len(report.fired) == 1 and report.errors == []
        with ctx.session() as session:
            assert (session.get(AlertRule, rule_id).value, session.get(AlertRule, rule_id).state) == (3.0, "firing")
    finally:
        ctx.store.redis.delete(queue)
    assert len(evaluate_all(ctx, celery_app, queue=Queued()).cleared) == 1


def test_one_rules_failure_costs_that_rule_only(ctx: PlatformContext, celery_app: Any, monkeypatch: pytest.MonkeyPatch):
    from cipherpool.scheduler import alerts as evaluate

    with ctx.session() as session:
        account, _ = provider(session, "m")
        rules.set_rule(session, account, "m", "queue_depth", 0)
        fine = rules.set_rule(session, account, "m", "average_query_s", 0).rule.id

    def unreachable(*_args: Any) -> int:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(evaluate, "queue_depth", unreachable)
    report = evaluate_all(ctx, celery_app, queue=Queued())
    assert len(report.errors) == 1 and "broker unreachable" in report.errors[0]
    with ctx.session() as session:
        assert session.get(AlertRule, fine).evaluated_at is not None


def test_a_webhook_call_that_cannot_be_queued_is_marked_failed(
    ctx: PlatformContext, celery_app: Any, monkeypatch: pytest.MonkeyPatch
):
    from cipherpool.scheduler import alerts as evaluate

    with ctx.session() as session:
        account, _ = provider(session, "m")
        rules.set_rule(session, account, "m", "queue_depth", 0, webhook_url=HOOK)
    monkeypatch.setattr(evaluate, "queue_depth", lambda *_args: 1)
    report = evaluate_all(ctx, celery_app, queue=Queued(accept=False))
    assert len(report.fired) == 1 and report.queued == []
    with ctx.session() as session:
        event = session.get(AlertEvent, report.fired[0])
        assert (event.delivery, event.attempts) == ("failed", 0) and "could not be queued" in event.last_error


def test_two_rounds_at_once_fire_once(ctx: PlatformContext, celery_app: Any, monkeypatch: pytest.MonkeyPatch):
    from cipherpool.scheduler import alerts as evaluate

    with ctx.session() as session:
        account, _ = provider(session, "m")
        rule_id = rules.set_rule(session, account, "m", "queue_depth", 0).rule.id
    both_read = threading.Barrier(2, timeout=10)

    def depth_after_both_read(*_args: Any) -> int:
        both_read.wait()  # each round has read the rule as ok before either writes
        return 5

    monkeypatch.setattr(evaluate, "queue_depth", depth_after_both_read)
    reports: list[Any] = []
    rounds = [threading.Thread(target=lambda: reports.append(evaluate_all(ctx, celery_app, queue=Queued()))) for _ in range(2)]
    for t in rounds:
        t.start()
    for t in rounds:
        t.join(timeout=30)
    assert len(reports) == 2 and all(r.errors == [] for r in reports)
    assert sorted(len(r.fired) for r in reports) == [0, 1]
    with ctx.session() as session:
        assert len(session.exec(select(AlertEvent).where(AlertEvent.rule_id == rule_id)).all()) == 1


# ---- where a webhook may point ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://localhost/",
        "http://api.localhost/",
    ],
)
def test_private_destinations_are_refused(url: str):
    with pytest.raises(RefusedDestination):
        destination.check_resolved(url, allow_private=False)
    destination.check_resolved(url, allow_private=True)  # where the operator allows them


def _resolving_to(*addresses: str) -> Any:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        family = socket.AF_INET6
        return [(family if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return getaddrinfo


@pytest.mark.parametrize(
    ("addresses", "refused"),
    [
        (["93.184.216.34"], False),
        (["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"], False),
        (["93.184.216.34", "10.0.0.5"], True),  # every address is checked, not only the first
        (["fe80::1%eth0"], True),
        (["127.0.0.1"], True),
    ],
)
def test_a_name_is_resolved_and_every_address_checked(monkeypatch: pytest.MonkeyPatch, addresses: list[str], refused: bool):
    monkeypatch.setattr(socket, "getaddrinfo", _resolving_to(*addresses))
    if refused:
        with pytest.raises(RefusedDestination, match="resolves to"):
            destination.check_resolved("https://hooks.example.com/x")
    else:
        destination.check_resolved("https://hooks.example.com/x")


# ---- delivery and its retries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "base", "retry_after", "wait"),
    [
        (1, 2.0, None, 2.0),
        (2, 2.0, None, 4.0),
        (3, 2.0, None, 8.0),
        (5, 2.0, None, 32.0),
        (9, 2.0, None, 512.0),
        (10, 2.0, None, webhook.MAX_BACKOFF_S),
        (30, 2.0, None, webhook.MAX_BACKOFF_S),
        (1, 0.5, None, 0.5),
        (1, 2.0, 30.0, 30.0),
        (3, 2.0, 1.0, 8.0),
        (1, 2.0, 10_000.0, webhook.MAX_BACKOFF_S),
    ],
)
def test_the_retry_schedule(attempt: int, base: float, retry_after: float | None, wait: float):
    assert webhook.backoff_s(attempt, base, retry_after) == wait


def fired_event(ctx: PlatformContext, url: str = HOOK) -> tuple[int, str, str]:
    """A fired event of a new rule with a webhook: (event id, secret, rule id)."""
    with ctx.session() as session:
        account, models = provider(session, "m")
        done = rules.set_rule(session, account, "m", "average_query_s", 1.0, webhook_url=url, allow_private=True)
        event = transition(session, Seen.of(done.rule, models["m"]), 2.5, datetime.now(UTC))
        assert event is not None and event.id is not None and done.secret is not None
        return event.id, done.secret, done.rule.id


class Scripted:
    """An httpx transport answering with the next scripted response, keeping each request."""

    def __init__(self, *answers: int | httpx.Response | Exception):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer if isinstance(answer, httpx.Response) else httpx.Response(answer, text="nope")

        return httpx.MockTransport(handle)


def _event(ctx: PlatformContext, event_id: int) -> AlertEvent:
    with ctx.session() as session:
        event = session.get(AlertEvent, event_id)
        session.expunge(event)
        return event


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(ctx: PlatformContext):
    event_id, secret, rule_id = fired_event(ctx)
    script = Scripted(500, httpx.ConnectTimeout("slow"), 200)
    outcomes = [webhook.attempt(ctx, event_id, script.transport()) for _ in range(3)]
    assert [(o.delivery, o.attempts, o.retry_in_s) for o in outcomes] == [
        (WebhookDelivery.PENDING, 1, 2.0),
        (WebhookDelivery.PENDING, 2, 4.0),
        (WebhookDelivery.DELIVERED, 3, None),
    ]
    event = _event(ctx, event_id)
    assert (event.delivery, event.attempts, event.last_error) == ("delivered", 3, None)
    assert event.delivered_at is not None
    # Every call is signed afresh and carries the event; a retry sends the same body.
    bodies = {r.content for r in script.requests}
    assert len(bodies) == 1
    for request in script.requests:
        assert signature.verify(secret, request.headers[signature.SIGNATURE_HEADER], request.content)
        assert request.headers[signature.EVENT_HEADER] == "fired"
        assert request.headers["content-type"] == "application/json"
    body = json.loads(bodies.pop())
    assert body == {
        "event_id": event.public_id,
        "rule_id": rule_id,
        "model": "m",
        "model_id": event.model_id,
        "metric": "average_query_s",
        "kind": "fired",
        "value": 2.5,
        "threshold": 1.0,
        "window_s": 300,
        "at": body["at"],
    }
    assert datetime.fromisoformat(body["at"]).tzinfo is not None
    # Delivered: a second copy of the task calls nobody.
    assert webhook.attempt(ctx, event_id, Scripted().transport()).delivery == WebhookDelivery.DELIVERED


@pytest.mark.parametrize(
    ("answers", "delivery", "attempts", "error"),
    [
        ([404], "failed", 1, "HTTP 404"),  # a 4xx: the same answer next time, so no retry
        ([401], "failed", 1, "HTTP 401"),
        ([302], "failed", 1, "redirects are not followed"),
        ([408, 200], "delivered", 2, None),  # 408 and 429 say "later"
        ([httpx.Response(429, headers={"Retry-After": "30"}), 200], "delivered", 2, None),
        ([500, 502, 503], "failed", 3, "HTTP 503"),  # webhook_attempts (3) spent
        ([httpx.ConnectError("refused")] * 3, "failed", 3, "ConnectError: refused"),
    ],
)
def test_what_is_retried_and_what_is_given_up(
    ctx: PlatformContext, answers: list[Any], delivery: str, attempts: int, error: str | None
):
    event_id, _secret, _rule = fired_event(ctx)
    script = Scripted(*answers)
    outcomes = []
    while not outcomes or outcomes[-1].retry_in_s is not None:
        outcomes.append(webhook.attempt(ctx, event_id, script.transport()))
    event = _event(ctx, event_id)
    assert (event.delivery, event.attempts) == (delivery, attempts) and script.answers == []
    assert (error is None and event.last_error is None) or error in event.last_error
    if answers and isinstance(answers[0], httpx.Response) and answers[0].status_code == 429:
        assert outcomes[0].retry_in_s == 30.0  # Retry-After, longer than the backoff


def test_a_refused_destination_is_never_called(ctx: PlatformContext):
    event_id, _secret, _rule = fired_event(ctx, url="http://127.0.0.1:9/hook")
    strict = PlatformContext(ctx.settings.model_copy(update={"webhook_allow_private": False}))
    script = Scripted()
    outcome = webhook.attempt(strict, event_id, script.transport())
    assert (outcome.delivery, outcome.retry_in_s, script.requests) == (WebhookDelivery.FAILED, None, [])
    assert "not a public address" in _event(ctx, event_id).last_error


def test_a_removed_rule_gives_its_pending_call_up(ctx: PlatformContext):
    event_id, _secret, rule_id = fired_event(ctx)
    with ctx.session() as session:
        session.delete(session.get(AlertRule, rule_id))
    outcome = webhook.attempt(ctx, event_id, Scripted().transport())
    assert (outcome.delivery, outcome.attempts) == (WebhookDelivery.FAILED, 0)
    assert "removed" in _event(ctx, event_id).last_error


def test_the_queued_task_carries_the_event_id_only(ctx: PlatformContext, celery_app: Any):
    """Neither the URL nor the secret travels through the broker (nor shows in Flower)."""
    import base64

    import msgpack

    from cipherpool.names import CONTROL_QUEUE, WEBHOOK_TASK

    event_id, secret, _rule = fired_event(ctx)
    ctx.store.redis.delete(CONTROL_QUEUE)
    try:
        assert webhook.queue_call(celery_app, event_id)
        raw = ctx.store.redis.lrange(CONTROL_QUEUE, 0, -1)
    finally:
        ctx.store.redis.delete(CONTROL_QUEUE)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["content-type"] == "application/x-msgpack"
    args, kwargs, _embed = msgpack.unpackb(base64.b64decode(message["body"]))
    assert (message["headers"]["task"], args, kwargs) == (WEBHOOK_TASK, [], {"event_id": event_id})
    assert secret not in raw[0].decode() and "hooks.example.com" not in raw[0].decode()


def test_the_celery_task_retries_a_real_receiver_until_it_answers(ctx: PlatformContext, monkeypatch: pytest.MonkeyPatch):
    """The task as a control worker runs it (eagerly here: Celery applies a retry at once
    instead of after its countdown), against a local HTTP receiver answering 500 then 200."""
    from cipherpool.config.settings import reset_settings

    monkeypatch.setenv("CIPHERPOOL_BROKER_URL", ctx.settings.broker_url or "")  # what the task module's app reads
    reset_settings()
    try:
        from cipherpool.tasks import control
    finally:
        monkeypatch.delenv("CIPHERPOOL_BROKER_URL")
        reset_settings()

    monkeypatch.setattr(control, "platform", lambda: ctx)
    with Receiver([500]) as receiver:
        event_id, secret, _rule = fired_event(ctx, url=receiver.url)
        result = control.webhook.apply(kwargs={"event_id": event_id}).get(disable_sync_subtasks=False)
        calls = receiver.received()
    assert result == {"ok": True, "value": {"event_id": event_id, "delivery": "delivered", "attempts": 2, "error": None}}
    assert len(calls) == 2 and all(signature.verify(secret, c.headers[signature.SIGNATURE_HEADER], c.body) for c in calls)
    assert calls[0].json()["event_id"] == _event(ctx, event_id).public_id and calls[0].path == "/hook"
    assert _event(ctx, event_id).delivery == "delivered"
