"""The platform's own health (issue 21): `cipherpool status`, GET /v1/platform/status, the
health families on /metrics, the gateways' watchdog and `up`'s alarm.

The rule (ok / late / missing from an age and an interval) is judged with a clock the test
passes in; everything that reads runs against a Redis this module starts on a free loopback
port (never the machine's own), and SQLite.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cipherpool.api.schemas import PlatformStatus
from cipherpool.config.settings import Settings
from cipherpool.monitoring import beat_jobs, heartbeats, platform_events
from cipherpool.monitoring.components import NodeSeen, Observed, evaluate, read_status
from cipherpool.monitoring.heartbeats import ProcessBeat, Role
from cipherpool.monitoring.liveness import LATE_AFTER_INTERVALS, MISSING_AFTER_INTERVALS, best, judge, worst
from cipherpool.names import PLATFORM_EVENTS_KEY, RECONCILE_TASK
from cipherpool.names import WATCHDOG_LEASE_KEY as LEASE_KEY
from cipherpool.statuses import Component, ComponentState, NodeStatus
from tests.helpers import own_redis

OK, LATE, MISSING = ComponentState.OK, ComponentState.LATE, ComponentState.MISSING
TOKEN = "platform-status-token-5b0e7c21"
NOW = 1_800_000_000.0  # the injected clock: unix seconds


def beat_of(instance: str, seen: float, interval_s: float = 10.0, started: float | None = None) -> ProcessBeat:
    return ProcessBeat(instance, "host", 4242, "0.test", started if started is not None else seen - 60, seen, interval_s)


def jobs(settings: Settings) -> dict[str, beat_jobs.BeatJob]:
    return {job.name: job for job in beat_jobs.schedule(settings)}


# --- the rule, with an injected clock ---------------------------------------------------------


def test_the_state_is_the_age_against_the_interval():
    assert (LATE_AFTER_INTERVALS, MISSING_AFTER_INTERVALS) == (1.5, 3.0)
    assert [judge(age, 10) for age in (0, 15, 15.01, 30, 30.01, 1e9)] == [OK, OK, LATE, LATE, MISSING, MISSING]
    assert judge(None, 10) is MISSING  # never heard of
    assert best([]) is MISSING and worst([]) is OK  # no replica at all; nothing to be late
    assert best([MISSING, LATE, OK]) is OK and worst([OK, LATE, MISSING]) is MISSING


def observed(settings: Settings, now: float) -> Observed:
    """Gateways ok (one of two), a late control worker, beat alive with billing overdue,
    nodes online, lost and offline, Redis half full."""
    runs = {job.task: now - 1 for job in beat_jobs.schedule(settings)}
    del runs[jobs(settings)["billing"].task]  # never ran: owed since beat started, 100 s ago
    return Observed(
        processes={
            Role.GATEWAY: [beat_of("gw-a", now - 2), beat_of("gw-b", now - 31)],
            Role.CONTROL: [beat_of("control@h", now - 20)],
            Role.BEAT: [beat_of("h:7", now - 1, started=now - 100)],
        },
        job_runs=runs,
        nodes=[
            NodeSeen("n1@h", "h", "cpu", False, NodeStatus.ONLINE, now - 5, 1),
            NodeSeen("n2@h", "h", "cpu", True, NodeStatus.ONLINE, now - 40, 3),
            NodeSeen("n3@h", "h", "gpu", False, NodeStatus.OFFLINE, now - 5, 0),
        ],
        used_memory=50 * 1024**2,
        maxmemory=100 * 1024**2,
    )


def test_each_component_is_judged_at_the_clock_it_is_given():
    settings = Settings(node_heartbeat_s=10)
    status = evaluate(observed(settings, NOW), settings, NOW)
    states = {c.component: c.state for c in status.components}
    assert states == {
        Component.GATEWAY: OK,
        Component.CONTROL: LATE,
        Component.BEAT: LATE,
        Component.NODES: OK,
        Component.STORE: OK,
        Component.DATABASE: OK,
    }
    assert status.state is LATE  # the worst of them
    assert [(g.instance, g.state) for g in status.gateways] == [("gw-a", OK), ("gw-b", MISSING)]
    judged = {j.job: j for j in status.beat_jobs}
    assert judged["billing"].last_run is None and judged["billing"].age_s == 100 and judged["billing"].state is LATE
    assert judged["reconcile"].age_s == 1 and judged["reconcile"].state is OK
    assert [(n.name, n.status, n.state, n.bound_models) for n in status.nodes] == [
        ("n1@h", "online", OK, 1),
        ("n2@h", "lost", MISSING, 3),
        ("n3@h", "offline", MISSING, 0),
    ]
    assert status.store.memory_ratio == 0.5
    detail = {c.component: c.detail for c in status.components}
    assert "gw-b missing" in detail[Component.GATEWAY] and "billing late (never ran" in detail[Component.BEAT]
    assert detail[Component.STORE] == "memory 50.0 MiB of 100.0 MiB (50.0%)"

    # Nothing written since: three billing intervals later everything is missing
    later = evaluate(observed(settings, NOW), settings, NOW + 3 * 60)
    assert {c.component: c.state for c in later.components}[Component.BEAT] is MISSING
    assert later.state is MISSING and all(g.state is MISSING for g in later.gateways)


def test_without_redis_the_processes_are_unknown_and_missing():
    settings = Settings()
    status = evaluate(Observed(store_error="ConnectionError: refused"), settings, NOW)
    states = {c.component: c.state for c in status.components}
    assert states[Component.STORE] is MISSING and states[Component.BEAT] is MISSING
    assert states[Component.NODES] is MISSING  # none registered (the database answered)
    assert all(j.age_s is None for j in status.beat_jobs)
    assert "unknown: the store is unreachable" in {c.component: c.detail for c in status.components}[Component.GATEWAY]

    from cipherpool.monitoring.health_metrics import health_families

    ages = {
        s.labels["job"]: s.value
        for f in health_families(status, None)
        for s in f.samples
        if s.name == "cipherpool_beat_job_age_seconds"
    }
    assert ages and all(math.isinf(v) for v in ages.values())  # unknown: > any threshold


# --- against a real Redis ---------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    ctx: Any
    redis: Any
    db: str


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with own_redis(tmp_path_factory, "platform-status") as url:
        yield url


@pytest.fixture
def world(redis_url, tmp_path, migrated_sqlite) -> Iterator[World]:
    """A fresh SQLite database (a copy of the session's migrated template: tests/conftest.py,
    which disposes its engine after) and this module's Redis, emptied."""
    from cipherpool.context import PlatformContext

    settings = Settings(
        data_dir=tmp_path / "data", broker_url=redis_url, metrics_token=TOKEN, token_rate_per_s=0, account_rate_per_s=0
    )
    db = migrated_sqlite(settings.effective_database_url())
    ctx = PlatformContext(settings)
    redis = ctx.store.redis
    for key in redis.scan_iter("cipherpool:platform:*"):  # this module's Redis: each test starts clean
        redis.delete(key)
    yield World(settings, ctx, redis, db)
    redis.close()


def healthy(world: World, now: float) -> None:
    """Every process heartbeating, every job just run, one node online."""
    from cipherpool.db import session_scope
    from cipherpool.db.tables import PoolNode

    for role in Role:
        heartbeats.write(world.redis, role, beat_of(f"{role.value}-1", now - 1))
    for job in beat_jobs.schedule(world.settings):
        beat_jobs.record_run(world.redis, job.task, now - 1)
    with session_scope(world.db) as session:
        node = session.get(PoolNode, "n1@h") or PoolNode(name="n1@h")
        node.status, node.last_seen = NodeStatus.ONLINE, datetime.fromtimestamp(now - 1, UTC)
        session.add(node)


def test_heartbeats_are_read_back_and_the_long_silent_forgotten(world):
    heartbeats.write(world.redis, Role.CONTROL, beat_of("old@h", NOW - heartbeats.FORGET_AFTER_S - 5))
    heartbeats.write(world.redis, Role.CONTROL, beat_of("new@h", NOW))
    assert [b.instance for b in heartbeats.read(world.redis, Role.CONTROL)] == ["new@h"]
    beat = heartbeats.Heartbeat(lambda: world.redis, Role.GATEWAY, "gw@h", 10.0, clock=lambda: NOW).start()
    (seen,) = heartbeats.read(world.redis, Role.GATEWAY)
    assert (seen.instance, seen.seen, seen.interval_s, seen.started) == ("gw@h", NOW, 10.0, NOW)
    beat.stop()  # a clean stop is not a missing process: the entry goes
    assert heartbeats.read(world.redis, Role.GATEWAY) == []


def test_one_watchdog_judges_and_records_each_change_once_it_held(world, caplog):
    from cipherpool.monitoring.watchdog import CONFIRM_CHECKS, Watchdog

    assert CONFIRM_CHECKS == 2
    now = time.time()
    healthy(world, now)
    first, second = Watchdog(world.ctx), Watchdog(world.ctx)
    # A platform first seen healthy is no news; the first to look holds the lease, the other
    # reads nothing while it does
    for _ in range(CONFIRM_CHECKS):
        status, recorded = first.check(now)
        assert status is not None and recorded == []
        assert second.check(now) == (None, [])

    # Beat dies (its heartbeat and its jobs stop) while the rest goes on: the judge records it
    # once it saw it at two checks in a row
    later = now + 40
    healthy(world, later)
    heartbeats.write(world.redis, Role.BEAT, beat_of("beat-1", now - 1))
    for job in beat_jobs.schedule(world.settings):
        beat_jobs.record_run(world.redis, job.task, now - 1)
    with caplog.at_level("ERROR", logger="cipherpool.platform"):
        status, recorded = first.check(later)
        assert status is not None and {c.component: c.state for c in status.components}[Component.BEAT] is MISSING
        assert recorded == [], "judged once: not news yet"
        recorded = first.check(later + 1)[1]
    assert [(e.component, e.previous, e.state) for e in recorded] == [(Component.BEAT, OK, MISSING)]
    assert first.check(later + 1)[1] == [] and second.check(later + 1) == (None, [])  # recorded already
    assert [r.getMessage().split(":")[1] for r in caplog.records if r.levelname == "ERROR"] == [" beat is missing (was ok)"]

    # Beat back: one event again, two checks later
    for job in beat_jobs.schedule(world.settings):
        beat_jobs.record_run(world.redis, job.task, later + 1)
    heartbeats.write(world.redis, Role.BEAT, beat_of("beat-1", later + 1))
    assert first.check(later + 2)[1] == []
    back = first.check(later + 2)[1]
    assert [(e.component, e.previous, e.state) for e in back] == [(Component.BEAT, MISSING, OK)]
    assert [e.id for e in platform_events.latest(world.redis, 10)] == [back[0].id, recorded[0].id]

    # The judge stops cleanly: the other takes over at its next check, and records nothing
    # that was recorded before
    first.release()
    for _ in range(CONFIRM_CHECKS + 1):
        status, recorded = second.check(later + 2)
        assert status is not None and recorded == []
    assert first.check(later + 2) == (None, [])
    assert platform_events.recorded_total(world.redis) == 2


def test_gateways_that_disagree_do_not_flap(world):
    """One gateway's clock runs 20 s ahead of the other's: to it everything is late. Each
    judging by itself, they swapped their views into the one record at every check."""
    from cipherpool.monitoring.watchdog import Watchdog

    now = time.time()
    on_time, ahead = Watchdog(world.ctx), Watchdog(world.ctx)
    judged: dict[str, set[ComponentState]] = {"on time": set(), "ahead": set()}
    recorded = []
    for tick in range(8):
        healthy(world, now + tick)
        for name, watchdog, skew in (("on time", on_time, 0), ("ahead", ahead, 20)):
            status, events = watchdog.check(now + tick + skew)
            recorded += events
            if status is not None:
                judged[name].add(status.state)
    assert judged == {"on time": {OK}, "ahead": set()}, "one judge: the one that took the lease first"
    assert recorded == [] and platform_events.recorded_total(world.redis) == 0

    # The judge crashes (its lease is not renewed, nor handed over): the other takes over when
    # the lease runs out, and records its own view once, not at every check
    world.redis.pexpire(LEASE_KEY, 1)
    time.sleep(0.05)
    for tick in range(8, 12):
        healthy(world, now + tick)
        recorded += ahead.check(now + tick + 20)[1]
    assert recorded and len({e.component for e in recorded}) == len(recorded), recorded
    assert all(e.state is not OK for e in recorded)


def test_a_state_is_recorded_only_once_judged_at_two_checks_in_a_row(world):
    """A job whose age hovers at the late threshold, a little late then on time: no event per
    flip; late at two checks in a row: one event."""
    from cipherpool.monitoring.watchdog import Watchdog

    watchdog = Watchdog(world.ctx)
    reconcile = jobs(world.settings)["reconcile"]
    now = time.time()

    def check(tick: int, late: bool) -> tuple[ComponentState, list[Any]]:
        at = now + tick
        healthy(world, at)
        age = reconcile.interval_s * LATE_AFTER_INTERVALS + (0.5 if late else -0.5)
        beat_jobs.record_run(world.redis, reconcile.task, at - age)
        status, events = watchdog.check(at)
        assert status is not None
        return {c.component: c.state for c in status.components}[Component.BEAT], events

    flapping = [check(tick, late=tick % 2 == 0) for tick in range(8)]
    assert [state for state, _ in flapping] == [LATE, OK] * 4
    assert all(events == [] for _, events in flapping)
    assert check(8, late=True)[1] == [] and [(e.component, e.state) for e in check(9, late=True)[1]] == [(Component.BEAT, LATE)]


def test_the_store_down_is_logged_once_by_each_watchdog(tmp_path, caplog):
    from cipherpool.context import PlatformContext
    from cipherpool.monitoring.watchdog import Watchdog
    from cipherpool.stack.supervisor import free_port

    watchdog = Watchdog(PlatformContext(Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")))
    with caplog.at_level("WARNING", logger="cipherpool.platform"):
        for _ in range(3):
            assert watchdog.check(NOW) == (None, [])
    (record,) = caplog.records
    assert record.levelname == "ERROR" and "the store (Redis) is unreachable" in record.getMessage()


def test_a_heartbeat_stop_does_not_wait_for_a_redis_that_does_not_answer(caplog):
    release = threading.Event()

    class Hung:
        def hset(self, *args: Any) -> None:
            release.wait(10)  # a partition: the write waits (for the socket timeout, in life)

        def hgetall(self, *args: Any) -> dict[bytes, bytes]:
            return {}

        def hdel(self, *args: Any) -> None:
            raise AssertionError("removed while a beat was in flight")

    beat = heartbeats.Heartbeat(lambda: Hung(), Role.GATEWAY, "gw@h", 10.0)  # type: ignore[arg-type, return-value]
    in_flight = threading.Thread(target=beat.beat, daemon=True)
    in_flight.start()
    try:
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="cipherpool.monitoring"):
            beat.stop(wait_s=0.2)
        assert time.monotonic() - started < 5
        assert any("still waits for Redis" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
        in_flight.join(10)
    beat.beat()  # stopped: no write, and no removal either


def test_a_state_log_logs_each_streak_once_with_its_levels(caplog):
    from cipherpool.waiting import StateLog

    clock = [10.0]
    state = StateLog(
        logging.getLogger("cipherpool.test"), level=logging.ERROR, recovered_level=logging.INFO, clock=lambda: clock[0]
    )
    with caplog.at_level(logging.DEBUG, logger="cipherpool.test"):
        assert state.up("never failed") is None
        assert state.down("%s is down", "x") and not state.down("%s is down", "y") and state.failing
        clock[0] += 2.5
        assert state.up("%s is back after %.1f s", "x", lasted=True) == 2.5
        assert state.up("%s is back after %.1f s", "x", lasted=True) is None
        state.failed(ValueError("one"))
        state.failed(ValueError("one"))
        state.failed(ValueError("two"))  # failed(): again when the problem changes, as before
        state.recovered("fine")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "x is down"),
        (logging.INFO, "x is back after 2.5 s"),
        (logging.ERROR, ": ValueError: one; trying again"),
        (logging.ERROR, ": ValueError: two; trying again"),
        (logging.INFO, ": fine"),
    ]


def test_a_first_state_that_is_not_ok_is_an_event():
    class FakeRedis:
        def __init__(self):
            self.values = {}

        def set(self, key, value, get=False):
            old, self.values[key] = self.values.get(key), value.encode()
            return old

    redis = FakeRedis()
    assert platform_events.swap_state(redis, Component.BEAT, MISSING) == platform_events.Change(Component.BEAT, None, MISSING)
    assert platform_events.swap_state(redis, Component.BEAT, MISSING) is None
    assert platform_events.swap_state(redis, Component.GATEWAY, OK) is None


def test_the_control_worker_heartbeats_and_a_pool_node_does_not(world, monkeypatch):
    from cipherpool.names import CONTROL_QUEUE, POOL_QUEUE
    from cipherpool.workers import control_signals

    monkeypatch.setattr(control_signals, "platform", lambda: world.ctx)

    def worker(name: str, queue: str) -> Any:
        return SimpleNamespace(
            hostname=name, app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={queue: object()})))
        )

    control_signals.on_worker_ready(sender=worker("node1@h", POOL_QUEUE))
    assert heartbeats.read(world.redis, Role.CONTROL) == []
    control_signals.on_worker_ready(sender=worker("control@h", CONTROL_QUEUE))
    assert [b.instance for b in heartbeats.read(world.redis, Role.CONTROL)] == ["control@h"]
    control_signals.on_beat_init(sender=None)
    assert len(heartbeats.read(world.redis, Role.BEAT)) == 1
    control_signals.on_worker_shutdown(sender=None)
    assert heartbeats.read(world.redis, Role.CONTROL) == []
    control_signals._running.pop(Role.BEAT).stop()


# --- the CLI ----------------------------------------------------------------------------------


def run_cli(world: World, *args: str) -> Any:
    from cipherpool.cli import cli

    return CliRunner().invoke(cli, ["--broker-url", world.settings.broker_url, "--data-dir", str(world.settings.data_dir), *args])


def test_status_prints_every_component_and_beat_missing(world):
    now = time.time()
    healthy(world, now)
    heartbeats.write(world.redis, Role.BEAT, beat_of("beat-1", now - 120))  # beat silent for 12 intervals
    world.redis.hdel(beat_jobs.BEAT_JOBS_KEY, RECONCILE_TASK)  # and reconcile never ran since
    from cipherpool.monitoring.watchdog import CONFIRM_CHECKS, Watchdog

    watchdog = Watchdog(world.ctx)
    for _ in range(CONFIRM_CHECKS):
        watchdog.check(now)
    result = run_cli(world, "status")
    assert result.exit_code == 7, result.output  # a component is missing: a probe or a script can act on it
    lines = result.stdout.splitlines()
    assert lines[0].startswith("platform: missing")
    rows = {line.split()[0]: line.split()[1] for line in lines[2:8]}
    assert rows == {"gateway": "ok", "control": "ok", "beat": "missing", "nodes": "ok", "store": "ok", "database": "ok"}
    beat_row = next(line for line in lines if line.startswith("beat "))
    assert "reconcile missing" in beat_row and "last seen 2 min ago" in beat_row
    assert any(line.startswith("reconcile ") and line.rstrip().endswith("missing") for line in lines)
    assert "latest platform events" in result.stdout

    as_json = run_cli(world, "status", "--json")
    status = PlatformStatus.model_validate_json(as_json.stdout)
    assert status.state is MISSING and status.events[0].component is Component.BEAT

    events = run_cli(world, "--json", "status", "--events", "--limit", "5")
    assert [e["component"] for e in json.loads(events.stdout)] == ["beat"]
    table = run_cli(world, "status", "--events")
    assert table.stdout.split()[:6] == ["ID", "AT", "COMPONENT", "PREVIOUS", "STATE", "DETAIL"]


def test_status_finds_the_local_stacks_redis_or_says_what_it_needs(tmp_path, monkeypatch):
    from cipherpool.cli import cli
    from cipherpool.cli.status import local_store_url

    settings = Settings(data_dir=tmp_path)
    assert local_store_url(settings) is None
    refused = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "status"])
    assert refused.exit_code != 0 and "CIPHERPOOL_BROKER_URL" in refused.stderr
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "redis.conf").write_text("bind 127.0.0.1\nport 6401\n")
    (tmp_path / "redis" / "password").write_text("s3cret\n")
    assert local_store_url(settings) == "redis://:s3cret@127.0.0.1:6401/0"


# --- over HTTP and /metrics -------------------------------------------------------------------


@pytest.fixture
def gateway(world) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from cipherpool.gateway.app import create_app

    with TestClient(create_app(world.settings), raise_server_exceptions=False) as client:
        yield client


def test_the_status_endpoint_answers_the_metrics_token_only(world, gateway):
    from cipherpool.db import session_scope
    from cipherpool.services.accounts import create_account
    from cipherpool.waiting import wait_until

    with session_scope(world.db) as session:
        _account, api_key = create_account(session, "provider")
    for authorization in (None, f"Bearer {api_key}", "Bearer wrong", f"Basic {TOKEN}"):
        headers = {"Authorization": authorization} if authorization else {}
        refused = gateway.get("/v1/platform/status", headers=headers)
        assert refused.status_code == 401 and refused.json()["code"] == "auth_error", authorization
        assert "beat" not in refused.text
    assert "/v1/platform/status" not in gateway.get("/openapi.json").text

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    # The gateway heartbeats from its lifespan: it sees itself
    status = wait_until(
        lambda: (s := PlatformStatus.model_validate(gateway.get("/v1/platform/status", headers=bearer).json())).gateways and s, 10
    )
    assert status.gateways[0].state is OK and {c.component for c in status.components} == set(Component)
    assert gateway.get("/v1/platform/status?events=x", headers=bearer).json()["code"] == "invalid_input"
    assert gateway.get("/v1/platform/status?events=0", headers=bearer).json()["events"] == []


def test_without_a_metrics_token_the_status_endpoint_is_absent(world):
    from fastapi.testclient import TestClient

    from cipherpool.gateway.app import create_app

    with TestClient(create_app(world.settings.model_copy(update={"metrics_token": None}))) as client:
        response = client.get("/v1/platform/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_metrics_export_components_and_beat_job_ages(world, gateway):
    now = time.time()
    healthy(world, now)
    world.redis.hset(beat_jobs.BEAT_JOBS_KEY, RECONCILE_TASK, repr(now - 600))
    response = gateway.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(response.text)
        for s in f.samples
    }
    assert found[("cipherpool_component_up", (("component", "beat"),))] == 0
    assert found[("cipherpool_component_up", (("component", "control"),))] == 1
    assert found[("cipherpool_component_state", (("component", "beat"), ("state", "missing")))] == 1
    assert found[("cipherpool_beat_job_age_seconds", (("job", "reconcile"),))] >= 600
    assert found[("cipherpool_beat_job_interval_seconds", (("job", "billing"),))] == world.settings.billing_interval_s
    assert found[("cipherpool_redis_memory_max_bytes", ())] == 64 * 1024**2
    assert 0 < found[("cipherpool_redis_memory_ratio", ())] < 1
    assert ("cipherpool_process_heartbeat_age_seconds", (("instance", "control-1"), ("role", "control"))) in found


# --- `up` never goes on silently without beat --------------------------------------------------


def test_up_shouts_about_beat_given_up_at_once_and_every_interval():
    from cipherpool.cli.vital import VitalAlarm

    lines: list[str] = []
    clock = [100.0]
    alarm = VitalAlarm(["reconcile", "billing"], clock=lambda: clock[0], echo=lines.append)
    alarm.given_up(SimpleNamespace(name="node1", log_path="logs/node1.log"))
    assert lines == ["error: node1 keeps exiting at start; not restarting it. See logs/node1.log"]
    alarm.given_up(SimpleNamespace(name="beat", log_path="logs/beat.log"))
    assert "ERROR: beat is DOWN" in lines[-1] and "logs/beat.log" in lines[-1] and "reconcile, billing" in lines[-1]
    clock[0] += 180
    stop = threading.Event()
    repeating = threading.Thread(target=alarm.repeat, args=(stop, 0.01))
    repeating.start()
    try:
        from cipherpool.waiting import wait_until

        wait_until(lambda: len(lines) >= 5, 5)
    finally:
        stop.set()
        repeating.join()
    assert all("beat is DOWN" in line and "given up 3 min ago" in line for line in lines[3:5])
    assert not any("node1 is DOWN" in line for line in lines)


def test_platform_events_are_capped_newest_first(world, monkeypatch):
    monkeypatch.setattr(platform_events, "EVENTS_KEPT", 2)
    for i in range(3):
        platform_events.record(world.redis, platform_events.Change(Component.NODES, OK, MISSING), f"n{i}", NOW + i)
    assert world.redis.llen(PLATFORM_EVENTS_KEY) == 2
    assert [(e.id, e.detail) for e in platform_events.latest(world.redis, 5)] == [(3, "n2"), (2, "n1")]
    assert read_status(world.ctx, NOW, events=1).events[0].at == datetime.fromtimestamp(NOW + 2, UTC)
