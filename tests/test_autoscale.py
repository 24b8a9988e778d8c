"""Autoscaling: the decision as tables (sustained and brief spikes, cool-downs, bounds,
idleness, depth per worker, queries waiting with no worker), a simulated run that never
flaps, and the beat job on real databases (SQLite and PostgreSQL, by ``db_url``) with pool
nodes registered in the database, a recording stand-in for Celery (what lifecycle tells the
nodes) and a gauge the test sets: workers added and removed, the events and their reasons,
blocked adds reported once per episode, and two beats at once acting once."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from redis import Redis
from sqlmodel import col, select

from cipherpool.clock import utcnow
from cipherpool.db import session_scope
from cipherpool.db.tables import Account, AutoscalePolicy, Model, ModelEvent, ModelStatus, Worker, WorkerStatus
from cipherpool.monitoring.timings import Sample
from cipherpool.scheduler.autoscale import (
    Action,
    Decision,
    Load,
    Reading,
    autoscale,
    decide,
    pick_worker,
    pressure,
    recent_wait,
)
from cipherpool.services import accounts, models, nodes
from cipherpool.services import autoscale as policies
from cipherpool.services import workers as worker_service
from cipherpool.statuses import EventKind, StopReason
from tests.test_management import artifact

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
POLICY = dict(
    target_queue_wait_s=5.0,
    target_queue_depth=None,
    scale_up_after_s=30.0,
    idle_after_s=300.0,
    cooldown_up_s=60.0,
    cooldown_down_s=300.0,
)
TIMES = ("above_since", "idle_since", "last_scaled_at")


def ago(seconds: float, now: datetime = NOW) -> datetime:
    return now - timedelta(seconds=seconds)


def make_policy(**over: Any) -> AutoscalePolicy:
    """A policy with the table's settings; times given as seconds before NOW."""
    fields = {**POLICY, **{k: (ago(v) if k in TIMES and v is not None else v) for k, v in over.items()}}
    return AutoscalePolicy(model_id="m", account_id="a", **fields)


def make_load(**over: Any) -> Load:
    fields: dict[str, Any] = dict(queue_wait_s=None, depth=0, workers=1, min_workers=1, max_workers=3, last_query_at=None)
    fields.update(over)
    if fields["last_query_at"] is not None:
        fields["last_query_at"] = ago(fields["last_query_at"])
    return Load(**fields)


# ---- the decision ------------------------------------------------------------------------

UP, DOWN, NONE = Action.UP, Action.DOWN, Action.NONE
TABLE = [
    # id, policy (times: seconds ago), load, action, blocked, what the reason says
    (
        "sustained-wait",
        dict(above_since=31),
        dict(queue_wait_s=7.2, depth=1),
        UP,
        False,
        "queue wait 7.2 s > target 5 s for 31 s: 1 → 2 workers",
    ),
    (
        "brief-spike",
        dict(above_since=10),
        dict(queue_wait_s=7.2, depth=1),
        NONE,
        False,
        "queue wait 7.2 s > target 5 s for 10 s of 30 s",
    ),
    ("first-seen-above", dict(), dict(queue_wait_s=7.2, depth=1), NONE, False, "for 0 s of 30 s"),
    ("at-target-is-not-above", dict(above_since=100), dict(queue_wait_s=5.0, depth=1), NONE, False, "within targets"),
    (
        "a-past-wait-with-an-empty-queue",
        dict(above_since=100),
        dict(queue_wait_s=9.0, last_query_at=1),
        NONE,
        False,
        "idle for 0 s of 300 s",
    ),
    (
        "cool-down-up",
        dict(above_since=100, last_scaled_at=20),
        dict(queue_wait_s=9, depth=1),
        NONE,
        False,
        "cool-down: 40 s left",
    ),
    ("cool-down-up-passed", dict(above_since=100, last_scaled_at=61), dict(queue_wait_s=9, depth=1), UP, False, "1 → 2 workers"),
    (
        "at-max",
        dict(above_since=100),
        dict(queue_wait_s=9, depth=1, workers=3, max_workers=3),
        NONE,
        True,
        "max_workers (3) already",
    ),
    ("above-max", dict(above_since=100), dict(queue_wait_s=9, depth=1, workers=4, max_workers=3), NONE, True, "max_workers"),
    (
        "depth-per-worker",
        dict(target_queue_wait_s=None, target_queue_depth=3, above_since=40),
        dict(depth=7, workers=2),
        UP,
        False,
        "queue depth 7 (3.5 per worker) > target 3 per worker for 40 s: 2 → 3 workers",
    ),
    (
        "depth-at-target",
        dict(target_queue_wait_s=None, target_queue_depth=3, above_since=40),
        dict(depth=6, workers=2),
        NONE,
        False,
        "within targets",
    ),
    ("depth-without-a-depth-target", dict(above_since=100), dict(depth=50, queue_wait_s=1.0), NONE, False, "within targets"),
    (
        "wait-without-a-wait-target",
        dict(target_queue_wait_s=None, target_queue_depth=3, above_since=100),
        dict(queue_wait_s=60.0, depth=1),
        NONE,
        False,
        "within targets",
    ),
    (
        "both-targets",
        dict(target_queue_depth=3, above_since=40),
        dict(queue_wait_s=9, depth=7, workers=2),
        UP,
        False,
        "queue wait 9.0 s > target 5 s and queue depth 7 (3.5 per worker) > target 3 per worker for 40 s: 2 → 3",
    ),
    (
        "zero-workers-with-a-queue",
        dict(above_since=31),
        dict(workers=0, min_workers=0, depth=2),
        UP,
        False,
        "2 queries waiting with no worker for 31 s: 0 → 1 workers",
    ),
    ("zero-workers-brief", dict(above_since=5), dict(workers=0, min_workers=0, depth=2), NONE, False, "for 5 s of 30 s"),
    (
        "zero-workers-empty-queue",
        dict(idle_since=1000),
        dict(workers=0, min_workers=0),
        NONE,
        False,
        "no worker and nothing queued",
    ),
    (
        "zero-workers-stale-wait",
        dict(above_since=100),
        dict(workers=0, min_workers=0, queue_wait_s=30.0),
        NONE,
        False,
        "no worker and nothing queued",
    ),
    ("below-min", dict(above_since=100), dict(workers=0, min_workers=1, depth=5), NONE, False, "below min_workers"),
    (
        "idle",
        dict(idle_since=301),
        dict(workers=2),
        DOWN,
        False,
        "idle for 301 s (no query computed, nothing queued): 2 → 1 workers",
    ),
    ("idle-to-zero", dict(idle_since=301), dict(workers=1, min_workers=0), DOWN, False, "1 → 0 workers"),
    ("idle-not-long-enough", dict(idle_since=200), dict(workers=2), NONE, False, "idle for 200 s of 300 s"),
    ("idle-at-min", dict(idle_since=1000), dict(workers=1), NONE, False, "at min_workers (1)"),
    ("idle-cool-down-down", dict(idle_since=1000, last_scaled_at=100), dict(workers=2), NONE, False, "cool-down: 200 s left"),
    (
        "a-recent-query-is-not-idle",
        dict(idle_since=1000),
        dict(workers=2, last_query_at=60),
        NONE,
        False,
        "idle for 60 s of 300 s",
    ),
    (
        "an-old-query-does-not-shorten-idle",
        dict(idle_since=400),
        dict(workers=2, last_query_at=900),
        DOWN,
        False,
        "idle for 400 s",
    ),
    ("a-waiting-query-is-not-idle", dict(idle_since=1000), dict(workers=2, depth=1), NONE, False, "within targets"),
]


@pytest.mark.parametrize(
    ("policy", "load", "action", "blocked", "reason"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_decision_table(policy, load, action, blocked, reason):
    decision = decide(make_policy(**policy), NOW, make_load(**load))
    assert (decision.action, decision.blocked) == (action, blocked), decision.reason
    assert reason in decision.reason
    if action is not NONE:
        assert decision.reason.startswith(decision.cause + ": ")


def test_the_exact_reason_of_an_add():
    decision = decide(make_policy(above_since=31), NOW, make_load(queue_wait_s=7.2, depth=2))
    assert decision.reason == "queue wait 7.2 s > target 5 s for 31 s: 1 → 2 workers"
    assert decision.cause == "queue wait 7.2 s > target 5 s for 31 s"


@pytest.mark.parametrize(
    ("policy", "load", "above", "idle"),
    [
        (dict(), dict(queue_wait_s=9, depth=1), NOW, None),  # pressure starts an episode now
        (dict(above_since=50, idle_since=10), dict(queue_wait_s=9, depth=1), ago(50), None),  # ... keeps it, ends idleness
        (dict(above_since=50), dict(queue_wait_s=9), None, NOW),  # the queue emptied: idle from now
        (dict(idle_since=70), dict(), None, ago(70)),  # idleness goes on
        (dict(idle_since=70), dict(depth=1), None, None),  # a waiting query ends it
        (dict(idle_since=70), dict(last_query_at=20), None, ago(20)),  # a query computed since restarts it
    ],
    ids=["starts-above", "keeps-above", "above-ends", "idle-goes-on", "queue-ends-idle", "query-restarts-idle"],
)
def test_the_episode_kept_on_the_policy(policy, load, above, idle):
    decision = decide(make_policy(**policy), NOW, make_load(**load))
    assert (decision.above_since, decision.idle_since) == (above, idle)


def test_pressure_says_what_is_above_its_target():
    assert pressure(make_policy(), make_load(queue_wait_s=4.9, depth=1)) is None
    assert pressure(make_policy(), make_load(queue_wait_s=5.1, depth=1)) == "queue wait 5.1 s > target 5 s"
    assert pressure(make_policy(), make_load(queue_wait_s=50.0, depth=0)) is None  # nothing waits now
    assert pressure(make_policy(), make_load(workers=0, depth=0)) is None
    assert (
        pressure(make_policy(target_queue_depth=1), make_load(workers=2, depth=3))
        == "queue depth 3 (1.5 per worker) > target 1 per worker"
    )


def test_naive_stored_times_are_read_as_utc():
    """SQLite gives back naive digits of UTC times: they mean the same instants."""
    policy = make_policy()
    policy.above_since = ago(31).replace(tzinfo=None)
    assert decide(policy, NOW, make_load(queue_wait_s=9, depth=1)).action is UP


# ---- over time: sustained vs brief, and never a flap ---------------------------------------


@dataclass
class Run:
    """A model's workers over simulated ticks, acting on every decision."""

    policy: AutoscalePolicy
    workers: int
    min_workers: int = 1
    max_workers: int = 3
    step_s: float = 10.0
    actions: list[tuple[float, Action]] = field(default_factory=list)
    last_query_at: datetime | None = None

    def tick(self, t: float, wait: float | None = None, depth: int = 0, query: bool = False) -> Decision:
        now = NOW + timedelta(seconds=t)
        if query:
            self.last_query_at = now
        load = Load(wait, depth, self.workers, self.min_workers, self.max_workers, self.last_query_at)
        decision = decide(self.policy, now, load)
        self.policy.above_since, self.policy.idle_since = decision.above_since, decision.idle_since
        if decision.action is not NONE:
            self.workers += 1 if decision.action is UP else -1
            self.policy.last_scaled_at = now
            self.actions.append((t, decision.action))
        return decision

    def run(self, seconds: float, start: float = 0.0, **load: Any) -> None:
        t = start
        while t < start + seconds:
            self.tick(t, **load)
            t += self.step_s


def test_a_brief_spike_adds_nothing_and_a_sustained_one_adds_one_worker_at_a_time():
    run = Run(make_policy(), workers=1)
    run.run(20, wait=9.0, depth=1, query=True)  # 20 s above the target: less than scale_up_after_s
    run.run(40, start=20, wait=2.0, depth=1, query=True)
    assert run.actions == []
    run.run(200, start=60, wait=9.0, depth=4, query=True)  # sustained from t=60
    # The first add once 30 s have passed, the next only after the 60 s cool-down, then max.
    assert run.actions == [(90.0, UP), (150.0, UP)]
    assert run.workers == 3


def test_idleness_removes_one_worker_per_cool_down_down_to_the_minimum():
    run = Run(make_policy(cooldown_down_s=120.0), workers=3)
    run.run(1000)
    assert run.actions == [(300.0, DOWN), (420.0, DOWN)] and run.workers == 1


@hyp_settings(max_examples=150, deadline=None)
@given(
    ticks=st.lists(st.tuples(st.sampled_from([None, 1.0, 9.0]), st.integers(0, 12), st.booleans()), max_size=120),
    bounds=st.tuples(st.integers(0, 2), st.integers(0, 3)).map(lambda b: (b[0], b[0] + max(1, b[1]))),
    start=st.integers(0, 5),
)
def test_any_load_stays_within_bounds_and_never_flaps(ticks, bounds, start):
    low, high = bounds
    workers = min(max(start, low), high)
    run = Run(make_policy(target_queue_depth=2, idle_after_s=60.0), workers, low, high)
    for i, (wait, depth, query) in enumerate(ticks):
        before = run.workers
        decision = run.tick(i * run.step_s, wait, depth, query)
        assert low <= run.workers <= high
        if decision.action is UP:  # only after the target held for scale_up_after_s
            assert decision.above_since is not None
            assert NOW + timedelta(seconds=i * run.step_s) - decision.above_since >= timedelta(seconds=30)
            assert before < high
    for (t0, _), (t1, action) in zip(run.actions, run.actions[1:]):
        cooldown = run.policy.cooldown_up_s if action is UP else run.policy.cooldown_down_s
        assert t1 - t0 >= cooldown


# ---- what the beat measures ------------------------------------------------------------------


def test_the_queue_wait_is_the_average_of_the_latest_queries_only():
    now = NOW.timestamp()
    samples = [Sample(now - 2, "w1", 6.0, 1.0), Sample(now - 10, "w2", 2.0, 1.0), Sample(now - 45, "w1", 100.0, 1.0)]
    wait, last = recent_wait(samples, NOW, window_s=30)
    assert wait == pytest.approx(4.0) and last == ago(2)  # the 45-s-old query is out of the window
    assert recent_wait([], NOW) == (None, None)
    assert recent_wait(samples[2:], NOW, window_s=30) == (None, ago(45))


def test_the_gauge_reads_recorded_times_and_the_brokers_queue(tmp_path):
    from cipherpool.config.celery import create_app
    from cipherpool.config.settings import Settings
    from cipherpool.dispatch import query_queue
    from cipherpool.monitoring.timings import recent_key
    from cipherpool.scheduler.autoscale import recorded
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    supervisor = Supervisor(tmp_path / "logs")
    try:
        _child, url = start_redis(supervisor, tmp_path / "redis", maxmemory_bytes=64 * 1024**2)
        redis = Redis.from_url(url)
        app = create_app(Settings(data_dir=tmp_path / "data", broker_url=url))
        model = Model(id="feedfacefeedface", account_id="a", name="m", hardware="cpu")
        now = utcnow()
        for at, wait in ((now.timestamp() - 50, 40.0), (now.timestamp() - 5, 3.0), (now.timestamp() - 1, 5.0)):
            redis.lpush(recent_key(model.id), Sample(at, "w1", wait, 1.0).encode())
        for _ in range(3):
            app.send_task("cipherpool.query.run", kwargs={}, queue=query_queue("cpu", model.id))
        reading = recorded(redis, app)(model, now)
        assert reading.queue_wait_s == pytest.approx(4.0) and reading.depth == 3
        assert abs((reading.last_query_at - now).total_seconds() + 1) < 0.01
        other = Model(id="0123456789abcdef", account_id="a", name="other", hardware="cpu")
        assert recorded(redis, app)(other, now) == Reading(None, 0, None)  # nothing recorded, no queue yet
        redis.close()
        app.close()
    finally:
        supervisor.stop_all(grace_s=5)


def test_the_worker_removed_is_the_autoscalers_newest_else_the_newest_not_of_a_schedule():
    def worker(wid: str, by: str, minutes: int) -> Worker:
        return Worker(
            id=wid, account_id="a", model_id="m", node_name="n", started_by=by, created_at=NOW + timedelta(minutes=minutes)
        )

    user, sched, auto1, auto2, late_user = (
        worker("u", "user", 0),
        worker("s", "schedule", 5),
        worker("a1", "autoscaler", 1),
        worker("a2", "autoscaler", 2),
        worker("u2", "reconciler", 9),
    )
    assert pick_worker([user, auto2, sched, auto1, late_user]).id == "a2"
    assert pick_worker([user, sched, late_user]).id == "u2"
    assert pick_worker([user, sched]).id == "u"
    assert pick_worker([sched]) is None and pick_worker([]) is None


# ---- the beat job on a database ----------------------------------------------------------------


class FakeApp:
    """What lifecycle sends the nodes (Celery's ``send_task``), recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], Any]] = []

    def send_task(self, name: str, kwargs: dict[str, Any] | None = None, queue: Any = None, **_: Any) -> None:
        self.sent.append((name, kwargs or {}, queue))


class Gauge:
    """The figures the test sets, per model name (default: nothing queued, no query)."""

    def __init__(self) -> None:
        self.readings: dict[str, Reading] = {}
        self.before_read: Any = None

    def __call__(self, model: Model, now: datetime) -> Reading:
        if self.before_read is not None:
            self.before_read(model)
        return self.readings.get(model.name, Reading(None, 0, None))


@dataclass
class Rig:
    url: str
    ctx: Any
    app: FakeApp
    gauge: Gauge
    account_id: str
    base: datetime

    def tick(self, seconds: float, **reading: Any) -> list[Any]:
        """One beat tick at ``base + seconds``; ``wait``/``depth``/``last`` (seconds) set model m's figures."""
        if reading:
            last = reading.get("last")
            self.gauge.readings["m"] = Reading(
                reading.get("wait"), reading.get("depth", 0), None if last is None else self.at(last)
            )
        return autoscale(self.ctx, self.app, now=self.at(seconds), gauge=self.gauge)

    def at(self, seconds: float) -> datetime:
        return self.base + timedelta(seconds=seconds)

    def serving(self, model: str = "m") -> list[Worker]:
        with session_scope(self.url) as s:
            return worker_service.serving(s, model_id=self.model_id(s, model))

    def events(self, kind: EventKind, model: str = "m") -> list[ModelEvent]:
        with session_scope(self.url) as s:
            return list(
                s.exec(
                    select(ModelEvent)
                    .where(ModelEvent.model_id == self.model_id(s, model), ModelEvent.kind == kind.value)
                    .order_by(col(ModelEvent.id))
                )
            )

    def policy(self, model: str = "m") -> AutoscalePolicy:
        with session_scope(self.url) as s:
            return s.get(AutoscalePolicy, self.model_id(s, model))

    def model_id(self, session: Any, name: str) -> str:
        return session.exec(select(Model.id).where(Model.account_id == self.account_id, Model.name == name)).one()


def make_rig(
    db_url: str,
    tmp_path,
    *,
    nodes_free: int = 2,
    min_workers: int = 1,
    max_workers: int = 2,
    running: int = 1,
    models_: tuple[str, ...] = ("m",),
    **policy: Any,
) -> Rig:
    """An account (100 credits) with active models of these names, each with ``running`` user
    workers up and an enabled policy (POLICY, overridden), and ``nodes_free`` more free nodes."""
    from cipherpool.config.settings import Settings
    from cipherpool.context import PlatformContext

    with session_scope(db_url) as s:
        account, _key = accounts.create_account(s, "acme", signup_grant=Decimal(100))
        for i in range(nodes_free + running * len(models_)):
            nodes.register_node(s, f"n{i}@test", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=1, pid=i + 1))
        s.flush()
        for name in models_:
            models.deploy_model(s, account, name, artifact(), min_workers=min_workers, max_workers=max_workers)
            models.set_status(s, account, name, ModelStatus.ACTIVE)
            for worker in worker_service.start_workers(s, account, name, 10, count=running) if running else []:
                worker_service.mark_running(s, worker.id, {1})
                worker_service.set_consuming(s, worker.id, True)
            policies.set_policy(s, account, name, {**POLICY, **policy}, interval_s=10)
    # The worker log's Redis is unreachable here: its lines are best effort, the decisions are not.
    ctx = PlatformContext(Settings(data_dir=tmp_path, database_url=db_url, broker_url="redis://127.0.0.1:1/0"))
    return Rig(db_url, ctx, FakeApp(), Gauge(), account.id, utcnow())


def test_a_sustained_queue_adds_a_worker_and_idleness_removes_it(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path)
    (user_worker,) = rig.serving()

    # Given a queue wait above the target: nothing at first, an add once it held 30 s.
    assert [o.action for o in rig.tick(0, wait=8.0, depth=3, last=0)] == [NONE]
    assert rig.policy().above_since == rig.at(0)
    assert rig.tick(20, wait=8.0, depth=3, last=20)[0].action is NONE
    (outcome,) = rig.tick(31, wait=8.0, depth=3, last=31)
    assert outcome.action is UP, outcome.reason
    added = next(w for w in rig.serving() if w.id != user_worker.id)
    assert (added.id, added.started_by, added.status) == (outcome.worker_id, "autoscaler", WorkerStatus.PENDING)
    assert ("cipherpool.node.bind", {"worker_id": added.id}) in [(n, k) for n, k, _ in rig.app.sent]
    (event,) = rig.events(EventKind.AUTOSCALED_UP)
    assert (
        event.message == (f"queue wait 8.0 s > target 5 s for 31 s: 1 → 2 workers (worker {added.id} on {added.node_name})")
        and event.worker_id == added.id
    )
    policy = rig.policy()
    assert (policy.last_scaled_at, policy.last_action) == (rig.at(31), "up")
    assert policy.last_reason == "queue wait 8.0 s > target 5 s for 31 s: 1 → 2 workers"

    # At max_workers, still above: blocked, reported once for the episode.
    assert rig.tick(60, wait=8.0, depth=3, last=60)[0].reason.endswith("cool-down: 31 s left")
    for t in (100, 110, 120):
        (outcome,) = rig.tick(t, wait=8.0, depth=3, last=t)
        assert outcome.blocked and "max_workers (2)" in outcome.reason
    assert len(rig.events(EventKind.AUTOSCALE_BLOCKED)) == 1 and len(rig.serving()) == 2
    assert rig.policy().last_scaled_at == rig.at(31)  # a blocked add starts no cool-down

    # When the queries stop: idle from the first empty tick, removed after 300 s, down to the minimum.
    rig.tick(130, depth=0, last=125)
    assert rig.policy().idle_since == rig.at(130) and rig.policy().above_since is None
    assert rig.tick(420, depth=0, last=125)[0].action is NONE
    (outcome,) = rig.tick(431, depth=0, last=125)
    assert outcome.action is DOWN and outcome.worker_id == added.id, outcome.reason
    with session_scope(rig.url) as s:
        stopped = s.get(Worker, added.id)
        assert (stopped.status, stopped.stop_reason) == (WorkerStatus.STOPPING, StopReason.AUTOSCALER.value)
    assert ("cipherpool.node.unbind", {"worker_id": added.id}) in [(n, k) for n, k, _ in rig.app.sent]
    (event,) = rig.events(EventKind.AUTOSCALED_DOWN)
    assert event.message.startswith("idle for 301 s (no query computed, nothing queued): 2 → 1 workers")
    assert [w.id for w in rig.serving()] == [user_worker.id]
    assert "at min_workers" in rig.tick(2000, depth=0, last=125)[0].reason  # never below the minimum
    assert [w.id for w in rig.serving()] == [user_worker.id]


def test_an_added_worker_is_committed_with_its_reason(db_url, tmp_path):
    """Whoever sees the autoscaler's worker sees why it was added: the event is written in the
    claim's transaction, before the node is told to bind (a reason written after that was
    missing for a moment to a provider's poll, and for good after a crash)."""
    rig = make_rig(db_url, tmp_path, scale_up_after_s=0.0)
    seen_at_bind: list[tuple[list[str], list[str]]] = []
    send = rig.app.send_task

    def send_and_look(name: str, kwargs: dict[str, Any] | None = None, queue: Any = None, **more: Any) -> None:
        if name == "cipherpool.node.bind":
            workers = [w.id for w in rig.serving() if w.started_by == "autoscaler"]
            seen_at_bind.append((workers, [e.worker_id for e in rig.events(EventKind.AUTOSCALED_UP)]))
        send(name, kwargs, queue, **more)

    rig.app.send_task = send_and_look  # type: ignore[method-assign]
    (outcome,) = rig.tick(0, wait=8.0, depth=3, last=0)
    assert outcome.action is UP, outcome.reason
    assert seen_at_bind == [([outcome.worker_id], [outcome.worker_id])]


def test_a_new_episode_of_pressure_is_reported_blocked_again(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path, max_workers=1, scale_up_after_s=0.0)
    for t in (0, 10, 20):
        assert rig.tick(t, wait=9.0, depth=1, last=t)[0].blocked
    rig.tick(30, wait=1.0, depth=1, last=30)  # back within target: the episode ends
    for t in (40, 50):
        assert rig.tick(t, wait=9.0, depth=1, last=t)[0].blocked
    blocked = rig.events(EventKind.AUTOSCALE_BLOCKED)
    assert [e.at for e in blocked] == [rig.at(0), rig.at(40)]
    assert all("max_workers (1)" in e.message for e in blocked)
    assert rig.policy().last_action == "blocked"


@pytest.mark.parametrize("why", ["no free node", "no credit"])
def test_a_refused_add_is_blocked_once_and_gives_its_claim_back(db_url, tmp_path, why):
    from cipherpool.billing import ledger
    from cipherpool.statuses import LedgerKind

    rig = make_rig(db_url, tmp_path, nodes_free=0 if why == "no free node" else 1, scale_up_after_s=0.0)
    if why == "no credit":
        with session_scope(rig.url) as s:
            balance = s.get(Account, rig.account_id).balance_micro
            ledger.append(s, rig.account_id, LedgerKind.ADJUSTMENT, -balance, "test:drain")
    for t in (0, 10, 20):
        (outcome,) = rig.tick(t, wait=9.0, depth=1, last=t)
        assert outcome.blocked and outcome.action is NONE
    (event,) = rig.events(EventKind.AUTOSCALE_BLOCKED)
    assert event.message.startswith("queue wait 9.0 s > target 5 s for 0 s, but a worker could not be added: ")
    assert ("node" in event.message) if why == "no free node" else ("credits missing" in event.message)
    policy = rig.policy()
    assert (policy.last_scaled_at, policy.last_action) == (None, "blocked")  # no cool-down for what did not happen
    assert len(rig.serving()) == 1 and not rig.events(EventKind.AUTOSCALED_UP)
    assert not any(name == "cipherpool.node.bind" for name, _, _ in rig.app.sent)


def test_queries_waiting_with_no_worker_start_one(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path, min_workers=0, max_workers=1, running=0, target_queue_wait_s=None, target_queue_depth=2)
    rig.tick(0, depth=1)
    (outcome,) = rig.tick(30, depth=1)
    assert outcome.action is UP and outcome.reason == "1 queries waiting with no worker for 30 s: 0 → 1 workers"
    assert [w.started_by for w in rig.serving()] == ["autoscaler"]


def test_a_schedules_workers_are_never_removed(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path, min_workers=0, running=1)
    with session_scope(rig.url) as s:
        for w in worker_service.serving(s, account_id=rig.account_id):
            w.started_by = "schedule"
            s.add(w)
    rig.tick(0, depth=0)
    (outcome,) = rig.tick(400, depth=0)
    assert outcome.action is NONE and "every worker was started by a schedule" in outcome.reason
    assert len(rig.serving()) == 1 and rig.policy().last_scaled_at is None


def test_only_enabled_policies_of_active_models_of_enabled_accounts_scale(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path, models_=("m", "off", "inactive"), scale_up_after_s=0.0, nodes_free=3)
    with session_scope(rig.url) as s:
        account = s.get(Account, rig.account_id)
        policies.disable_policy(s, account, "off")
        models.set_status(s, account, "inactive", ModelStatus.INACTIVE)
    for name in ("m", "off", "inactive"):
        rig.gauge.readings[name] = Reading(9.0, 5, rig.at(0))
    assert [(o.model, o.action) for o in rig.tick(0)] == [("m", UP)]
    with session_scope(rig.url) as s:
        s.get(Account, rig.account_id).disabled_at = utcnow()
    assert rig.tick(100) == []


def test_one_models_unreadable_figures_do_not_stop_the_others(db_url, tmp_path):
    rig = make_rig(db_url, tmp_path, models_=("broken", "m"), scale_up_after_s=0.0, nodes_free=2)

    def fail_for_broken(model: Model) -> None:
        if model.name == "broken":
            raise ConnectionError("broker gone")

    rig.gauge.before_read = fail_for_broken
    rig.gauge.readings["m"] = Reading(9.0, 5, rig.at(0))
    assert [(o.model, o.action) for o in rig.tick(0)] == [("m", UP)]


@pytest.mark.parametrize("trouble", ["broker after the stop", "refused before it"])
def test_a_removal_whose_stop_fails(db_url, tmp_path, monkeypatch, trouble):
    """The broker failing after the stop was committed: the removal stands, its event says so.
    A stop refused before anything was recorded: the claim is given back, nothing happened."""
    from kombu.exceptions import OperationalError

    from cipherpool import lifecycle
    from cipherpool.errors import WrongWorkerState

    rig = make_rig(db_url, tmp_path, running=2)
    if trouble == "broker after the stop":

        def refuse_unbind(name: str, **_: Any) -> None:
            raise OperationalError("connection refused")

        rig.app.send_task = refuse_unbind  # type: ignore[method-assign]
    else:

        def refuse(*_: Any, **__: Any) -> None:
            raise WrongWorkerState("not now")

        monkeypatch.setattr(lifecycle, "stop_worker", refuse)
    rig.tick(0, depth=0)
    (outcome,) = rig.tick(400, depth=0)
    if trouble == "broker after the stop":
        assert outcome.action is DOWN and len(rig.serving()) == 1
        (event,) = rig.events(EventKind.AUTOSCALED_DOWN)
        assert "its node could not be told yet: Cannot reach the broker" in event.message
        assert rig.policy().last_scaled_at == rig.at(400)
    else:
        assert outcome.action is NONE and outcome.reason.endswith(": not now")
        assert len(rig.serving()) == 2 and not rig.events(EventKind.AUTOSCALED_DOWN)
        assert (rig.policy().last_scaled_at, rig.policy().last_action) == (None, None)  # as before the claim


@pytest.mark.parametrize("action", [UP, DOWN, "blocked"])
def test_two_beats_at_once_act_once(db_url, tmp_path, action):
    """Both read the policy and the workers, then both decide the same: one claim wins."""
    rig = make_rig(
        db_url,
        tmp_path,
        scale_up_after_s=0.0,
        max_workers=1 if action == "blocked" else 2,
        running=2 if action is DOWN else 1,
        min_workers=1,
    )
    if action is DOWN:
        rig.tick(0, depth=0)
        start = 400
    else:
        rig.gauge.readings["m"] = Reading(9.0, 5, rig.at(0))
        start = 0
    barrier = threading.Barrier(2, timeout=20)
    rig.gauge.before_read = lambda _model: barrier.wait()
    results: list[Any] = []

    def beat() -> None:
        results.append(autoscale(rig.ctx, rig.app, now=rig.at(start), gauge=rig.gauge))

    threads = [threading.Thread(target=beat) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    outcomes = [o for found in results for o in found]
    assert len(outcomes) == 2
    if action == "blocked":
        assert len(rig.events(EventKind.AUTOSCALE_BLOCKED)) == 1
        return
    assert sorted(o.action.value for o in outcomes) == sorted([action.value, "none"])
    assert "another beat acted on this model" in [o.reason for o in outcomes]
    kind = EventKind.AUTOSCALED_UP if action is UP else EventKind.AUTOSCALED_DOWN
    assert len(rig.events(kind)) == 1
    assert len(rig.serving()) == (2 if action is UP else 1)


def test_a_stale_claim_changes_nothing(db_url, tmp_path):
    """The compare-and-set itself: a beat that read an older ``last_scaled_at`` loses."""
    from cipherpool.scheduler.autoscale import _claim

    rig = make_rig(db_url, tmp_path)
    seen = rig.policy()
    assert _claim(rig.ctx, seen, UP, "first", rig.at(0)) is True
    assert _claim(rig.ctx, seen, UP, "second", rig.at(1)) is False  # seen.last_scaled_at is None no more
    assert _claim(rig.ctx, rig.policy(), DOWN, "third", rig.at(2)) is True
    policy = rig.policy()
    assert (policy.last_scaled_at, policy.last_action, policy.last_reason) == (rig.at(2), "down", "third")


# ---- the policy as a provider sets it (the service; HTTP in test_autoscale_api.py) --------------


def test_set_show_and_turn_off_a_policy(session):
    account, _ = accounts.create_account(session, "acme")
    models.deploy_model(session, account, "m", artifact(), max_workers=3)
    model, policy = policies.get_policy(session, account, "m")
    assert policy is None and policies.describe(session, model, None).enabled is False

    _, policy = policies.set_policy(session, account, "m", {"target_queue_depth": 4, "idle_after_s": 120.0}, 10)
    shown = policies.describe(session, model, policy)
    assert (shown.enabled, shown.target_queue_wait_s, shown.target_queue_depth, shown.idle_after_s) == (True, 5.0, 4, 120)
    _, policy = policies.set_policy(session, account, "m", {"target_queue_wait_s": None, "cooldown_up_s": None}, 10)
    assert (policy.target_queue_wait_s, policy.target_queue_depth, policy.cooldown_up_s) == (None, 4, 60.0)
    policy.above_since = utcnow()
    _, off = policies.disable_policy(session, account, "m")
    assert (off.enabled, off.above_since, off.target_queue_depth) == (False, None, 4)
    messages = [
        e.message
        for e in session.exec(
            select(ModelEvent)
            .where(ModelEvent.model_id == model.id, ModelEvent.kind == EventKind.SETTINGS_CHANGED.value)
            .order_by(col(ModelEvent.id))
        )
    ]
    assert messages[0].startswith("autoscaling on: add a worker after 30 s of queue wait > 5 s or > 4 waiting per")
    assert messages[-1] == "autoscaling off" and len(messages) == 3
    assert policies.disable_policy(session, account, "m")[1].enabled is False  # off again: nothing more
    models.delete_model(session, account, "m")  # the policy goes with its model
    assert session.get(AutoscalePolicy, model.id) is None


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"target_queue_wait_s": None}, "needs a target"),
        ({"target_queue_wait_s": 0.0}, "more than 0 s"),
        ({"target_queue_depth": 0}, "at least 1"),
        ({"scale_up_after_s": -1.0}, "0 s or more"),
        ({"idle_after_s": 0.0}, "more than 0 s"),
        ({"cooldown_up_s": 5.0}, "cooldown_up_s must be at least the autoscaling interval (10 s)"),
        ({"cooldown_down_s": 9.9}, "cooldown_down_s must be at least"),
    ],
    ids=["no-target", "zero-wait", "zero-depth", "negative-delay", "zero-idle", "short-cool-down-up", "short-cool-down-down"],
)
def test_a_policy_that_cannot_work_is_refused(changes, says):
    """What set_policy checks once the changes are applied (refused, it changes nothing: below)."""
    from cipherpool.errors import InvalidInput

    policies.check_policy(make_policy(), 10)
    with pytest.raises(InvalidInput, match=re.escape(says)):
        policies.check_policy(make_policy(**changes), 10)


def test_a_refused_policy_changes_nothing(session):
    from cipherpool.errors import InvalidInput

    account, _ = accounts.create_account(session, "acme")
    models.deploy_model(session, account, "m", artifact())
    for changes in ({"enabled": False}, {"target_queue_wait_s": None}, {"cooldown_up_s": 1.0}):
        with pytest.raises(InvalidInput):
            policies.set_policy(session, account, "m", changes, 10)
        assert session.get(AutoscalePolicy, models.get_model(session, account, "m").id) is None
    policies.set_policy(session, account, "m", {}, 10)  # the defaults work
    session.flush()
    for changes, says in (
        ({"target_queue_wait_s": None}, "needs a target"),
        ({"enabled": False}, "Unknown"),
        ({"target_queue_depth": 2, "cooldown_down_s": 5.0}, "cooldown_down_s"),
    ):
        with pytest.raises(InvalidInput, match=says):
            policies.set_policy(session, account, "m", changes, 10)
    reload = session.get(AutoscalePolicy, models.get_model(session, account, "m").id)
    session.refresh(reload)
    assert (reload.target_queue_wait_s, reload.target_queue_depth, reload.cooldown_down_s) == (5.0, None, 300.0)


def test_another_accounts_model_has_no_policy_to_set(session):
    from cipherpool.errors import ModelNotFound

    alice, _ = accounts.create_account(session, "alice")
    bob, _ = accounts.create_account(session, "bob")
    models.deploy_model(session, bob, "m", artifact())
    for call in (
        lambda: policies.get_policy(session, alice, "m"),
        lambda: policies.set_policy(session, alice, "m", {}, 10),
        lambda: policies.disable_policy(session, alice, "m"),
    ):
        with pytest.raises(ModelNotFound):
            call()
