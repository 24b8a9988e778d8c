"""Lost time (issue 21): a worker is charged only for time its node was heard in.

Beat's tick charges a worker holding its node no further than the node's last heartbeat; a
lost node's worker ends up charged exactly from its start to that heartbeat (what a stop or an
older tick charged past it is given back, once); a node that restarts holding its worker is
not charged for its downtime, which its model's events record; and the reconciler's
replacement of a lost worker is started as the lost one was (by a schedule, for it, of its
profile), so the schedule's window end stops it. Every case runs on SQLite and PostgreSQL
(``db_url``); times are injected, nothing sleeps. Fixed times are in the past, because a
failure's own stop is stamped with the real clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from cipherpool import lifecycle, workerlog
from cipherpool.billing.charging import charge_all, epoch_ms, epoch_us, refund_after, settle, skip_silence, unbilled_workers
from cipherpool.billing.money import MS_PER_HOUR as H
from cipherpool.clock import utcnow
from cipherpool.db import session_scope
from cipherpool.db.tables import LedgerEntry, ModelEvent, PoolNode, Worker, WorkerStatus
from cipherpool.names import BIND_TASK
from cipherpool.scheduler import reconcile as reconciler
from cipherpool.services import nodes
from cipherpool.services.reconcile import fail_lost_workers
from cipherpool.statuses import EventKind, LedgerKind, StopReason
from tests import test_schedules
from tests.test_billing import RUNTIME, STANDBY, Rig, check_books, make_worker, set_status, worker_lines, worker_row
from tests.test_schedules import FRIDAY_0930, FRIDAY_2100, OFFICE, Beat

beat = test_schedules.beat  # its fixture: alice's model "m", three nodes, a fake Celery app

START = datetime(2025, 1, 1, 22, 0, 0, 123_456, tzinfo=UTC)  # a fraction of a millisecond, on purpose
HEARTBEAT_S = 10.0


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def exact(*pieces: tuple[int, datetime, datetime]) -> tuple[int, int]:
    """What pieces of time (rate, from, to) cost together, and the fraction carried: the whole
    sum ⌊Σ rate × ms / 1 h⌋, milliseconds counted as the code counts them."""
    return divmod(sum(rate * (epoch_ms(b) - epoch_ms(a)) for rate, a, b in pieces), H)


def hear(rig: Rig, moment: datetime) -> None:
    """The node's last heartbeat is ``moment``."""
    with session_scope(rig.url) as s:
        node = s.get(PoolNode, rig.node)
        node.last_seen = moment
        s.add(node)


def tick(rig: Rig, settings, now: datetime) -> list[LedgerEntry]:
    report = charge_all(lambda: session_scope(rig.url), None, settings, now)
    assert report.errors == []
    return report.charged


def net_charged(rig: Rig) -> int:
    """The worker's charges less what was given back (refund lines name the worker too)."""
    return -sum(line.amount for line in worker_lines(rig))


def refunds(rig: Rig) -> list[LedgerEntry]:
    return [line for line in worker_lines(rig) if line.kind == LedgerKind.REFUND.value]


# -- the tick -------------------------------------------------------------------------------


def test_a_tick_charges_a_silent_node_only_up_to_its_last_heartbeat(db_url, settings):
    # Given a worker up since START whose node was last heard at 600.5 s
    rig = make_worker(db_url, started_at=START)
    hear(rig, at(600.5))
    # When beat's tick runs an hour later
    lines = tick(rig, settings, at(3600))
    # Then it charges up to the heartbeat only, exactly
    assert [(line.period_start, line.period_end) for line in lines] == [(START, at(600.5))]
    assert -sum(line.amount for line in lines) == exact((RUNTIME, START, at(600.5)))[0] == 166_805
    assert worker_row(rig).billed_to == at(600.5)
    # And while the node stays silent, later ticks charge nothing (nor list it)
    assert tick(rig, settings, at(7200)) == []
    with session_scope(db_url) as s:
        assert rig.worker_id not in unbilled_workers(s, at(7200))
    # When it is heard again, the next tick goes on from where the last one stopped (to UTC midnight, and on)
    hear(rig, at(7200.25))
    lines = tick(rig, settings, at(7201))
    assert (lines[0].period_start, lines[-1].period_end, len(lines)) == (at(600.5), at(7200.25), 2)
    # And a stop at its own moment (past the last heartbeat) is charged up to that moment
    with session_scope(db_url) as s:
        settle(s, rig.worker_id, at(7203.5))
    assert net_charged(rig) == exact((RUNTIME, START, at(7203.5)))[0] == 2_000_972
    assert worker_row(rig).billed_remainder == exact((RUNTIME, START, at(7203.5)))[1]
    check_books(db_url, rig.account_id)


# -- a lost node ----------------------------------------------------------------------------

HEARD = at(6000.4567)  # the lost node's last heartbeat: 23:40:00.580 (the next UTC midnight: at(7200))
CASES = [
    # what was charged before the reconciler noticed: (status, until) settles in order
    pytest.param(WorkerStatus.UP, [], 0, id="nothing-charged"),
    pytest.param(WorkerStatus.UP, ["tick:3000", "tick:9000"], 0, id="capped-ticks-nothing-to-give-back"),
    pytest.param(
        WorkerStatus.UP, [(WorkerStatus.UP, at(3000)), (WorkerStatus.UP, at(6040.001))], 10_985, id="older-tick-charged-40s-past"
    ),
    pytest.param(WorkerStatus.UP, [(WorkerStatus.UP, at(7500.999))], 416_817, id="charged-past-midnight"),
    pytest.param(
        WorkerStatus.STANDBY,
        [(WorkerStatus.STANDBY, at(6010)), (WorkerStatus.UP, at(6040))],
        8598,
        id="standby-then-resumed-after-the-heartbeat",
    ),
]


@pytest.mark.parametrize(("status", "settles", "given_back"), CASES)
def test_a_lost_worker_is_charged_exactly_from_its_start_to_its_last_heartbeat(db_url, settings, status, settles, given_back):
    # Given a worker (standby or up) whose node was last heard at HEARD, charged as `settles` say
    rig = make_worker(db_url, started_at=START, status=status)
    hear(rig, HEARD)
    for step in settles:
        if isinstance(step, str):  # beat's tick, which stops at the heartbeat
            tick(rig, settings, at(float(step.split(":")[1])))
            continue
        state, until = step  # a settle at its own moment (a resume, a stop), or an older version's tick
        set_status(rig, state)
        with session_scope(db_url) as s:
            settle(s, rig.worker_id, until)
    # When the reconciler finds the node lost
    with session_scope(db_url) as s:
        (lost,) = fail_lost_workers(s, HEARTBEAT_S, now=HEARD + timedelta(seconds=3 * HEARTBEAT_S + 1))
    assert lost.worker_id == rig.worker_id
    # Then what it paid is exactly its state's rate from its start to the heartbeat
    rate = STANDBY if status == WorkerStatus.STANDBY else RUNTIME
    owed, fraction = exact((rate, START, HEARD))
    assert net_charged(rig) == owed
    worker = worker_row(rig)
    assert worker.billed_remainder == fraction
    assert worker.status == WorkerStatus.FAILED and worker.billed_to == worker.stopped_at
    # And what was charged past the heartbeat came back as one refund line, keyed by it
    back = refunds(rig)
    assert [line.amount for line in back] == ([given_back] if given_back else [])
    for line in back:
        assert line.key == f"worker:{rig.worker_id}:refund:{epoch_us(HEARD)}" and line.period_start == HEARD
    # And nothing is charged or given back again: not by a tick, nor a second skip or refund
    assert tick(rig, settings, utcnow() + timedelta(days=1)) == []
    with session_scope(db_url) as s:
        assert skip_silence(s, rig.worker_id, HEARD, utcnow()) == []
        assert refund_after(s, rig.worker_id, HEARD) is None
    assert net_charged(rig) == owed and worker_row(rig).billed_remainder == fraction
    check_books(db_url, rig.account_id)


# -- a node that restarts within the loss window --------------------------------------------


@pytest.mark.parametrize(
    ("charged_to", "given_back"),
    [
        pytest.param(None, 0, id="ticks-only"),
        pytest.param(at(65), 1389, id="a-standby-settled-5s-past-the-heartbeat"),
    ],
)
def test_a_restart_within_the_window_charges_nothing_for_the_downtime(db_url, settings, charged_to, given_back):
    # Given a worker up since START, its node last heard at 60 s and charged up to then
    rig = make_worker(db_url, started_at=START)
    hear(rig, at(60))
    tick(rig, settings, at(62))
    if charged_to is not None:
        with session_scope(db_url) as s:
            settle(s, rig.worker_id, charged_to)
    # When the node registers again at 77 s, within 3 heartbeats, still holding its worker
    with session_scope(db_url) as s:
        registered = nodes.register(
            s,
            rig.node,
            nodes.NodeInfo(host_class=rig.host_class, profile=rig.profile, concurrency=1, threads=1, pid=2),
            now=at(77),
        )
    # Then the 17 s it was down are not owed, and it says so
    assert registered.downtime == nodes.Downtime(rig.worker_id, rig.node, at(60), at(77))
    assert registered.downtime.seconds == 17.0
    worker = worker_row(rig)
    assert worker.status == WorkerStatus.UP and worker.billed_to == at(77)
    assert [line.amount for line in refunds(rig)] == ([given_back] if given_back else [])
    with session_scope(db_url) as s:
        node = s.get(PoolNode, rig.node)
        assert node.worker_id == rig.worker_id and node.last_seen == at(77)
        (event,) = s.exec(select(ModelEvent).where(ModelEvent.kind == EventKind.WORKER_DOWNTIME.value)).all()
        assert event.worker_id == rig.worker_id and event.model_id == rig.model_id and "down 17.0 s" in event.message
        # And the reconciler does not take it for lost
        assert fail_lost_workers(s, HEARTBEAT_S, now=at(77 + 3 * HEARTBEAT_S - 1)) == []
    # When it is heard at 137 s and beat ticks, the time from 77 s on is charged, the gap never
    hear(rig, at(137))
    assert [(line.period_start, line.period_end) for line in tick(rig, settings, at(140))] == [(at(77), at(137))]
    owed, fraction = exact((RUNTIME, START, at(60)), (RUNTIME, at(77), at(137)))
    assert net_charged(rig) == owed == 33_333
    assert worker_row(rig).billed_remainder == fraction
    check_books(db_url, rig.account_id)


def test_a_node_registering_without_a_worker_has_no_downtime(db_url):
    rig = make_worker(db_url, started_at=START, status=WorkerStatus.STOPPED)
    with session_scope(db_url) as s:
        s.get(PoolNode, rig.node).worker_id = None
    hear(rig, at(60))
    with session_scope(db_url) as s:
        registered = nodes.register(
            s, rig.node, nodes.NodeInfo(host_class=rig.host_class, concurrency=1, threads=1, pid=2), now=at(77)
        )
        assert registered.downtime is None
        assert s.exec(select(ModelEvent).where(col(ModelEvent.kind) == EventKind.WORKER_DOWNTIME.value)).all() == []


# -- the replacement of a lost worker -------------------------------------------------------


@pytest.fixture
def worker_logs(monkeypatch) -> dict[str, list[str]]:
    """The lines written to each worker's log (the test's Redis is unreachable)."""
    lines: dict[str, list[str]] = {}
    monkeypatch.setattr(
        workerlog, "write", lambda _redis, worker_id, message, **_: lines.setdefault(worker_id, []).append(message)
    )
    return lines


def lose(beat: Beat, worker: Worker) -> None:
    """Its node goes silent for more than 3 heartbeats (beat's settings' heartbeat)."""
    silent = 3 * beat.ctx.settings.node_heartbeat_s + 1
    with session_scope(beat.db) as s:
        node = s.get(PoolNode, worker.node_name)
        node.last_seen = utcnow() - timedelta(seconds=silent)
        s.add(node)


def test_a_schedules_replacement_stays_the_schedules_and_stops_at_its_window_end(beat, worker_logs):
    # Given a schedule's two workers of profile "default" running in Friday's window
    sid = beat.schedule(**OFFICE, profile="default")
    assert beat.tick(FRIDAY_0930).started == [sid]
    first, second = beat.workers(sid)
    # When the first one's node is lost and the reconciler runs
    lose(beat, first)
    (lost,) = reconciler.reconcile(beat.ctx, beat.app)
    # Then its replacement is the schedule's, of the same profile, started on the free node
    assert lost.worker_id == first.id and lost.replace
    workers = {w.id: w for w in beat.workers(sid)}
    (replacement,) = set(workers) - {second.id}
    row = workers[replacement]
    assert (row.started_by, row.schedule_id, row.profile) == ("schedule", sid, "default")
    assert row.node_name not in (first.node_name, second.node_name) and beat.sends(BIND_TASK) == 3
    # And each worker's log names the other
    assert f"replaced by worker {replacement}" in worker_logs[first.id]
    assert any(line.startswith(f"replaces worker {first.id}") for line in worker_logs[replacement])
    # When the window closes, the schedule stops both
    assert beat.tick(FRIDAY_2100).stopped == [sid]
    assert beat.workers(sid) == []
    with session_scope(beat.db) as s:
        assert s.get(Worker, replacement).stop_reason == StopReason.SCHEDULE.value
        assert s.get(Worker, second.id).stop_reason == StopReason.SCHEDULE.value


def test_an_autoscaled_replacement_stays_the_autoscalers(beat, worker_logs):
    (started,) = lifecycle.start_workers(beat.ctx, beat.app, beat.account_id, "m", profile="default", started_by="autoscaler")
    lose(beat, started)
    (lost,) = reconciler.reconcile(beat.ctx, beat.app)
    with session_scope(beat.db) as s:
        (row,) = s.exec(select(Worker).where(col(Worker.status).in_([WorkerStatus.PENDING]))).all()
    assert row.id != started.id and (row.started_by, row.schedule_id, row.profile) == ("autoscaler", None, "default")
    assert lost.worker_id == started.id and f"replaced by worker {row.id}" in worker_logs[started.id]


def test_a_stop_of_a_silent_nodes_worker_charges_up_to_its_last_heartbeat(db_url, settings):
    from cipherpool.db.tables import Account
    from cipherpool.services.workers import request_stop

    # Given a worker whose node went silent at HEARD, charged by a tick before that
    rig = make_worker(db_url, started_at=START)
    hear(rig, HEARD)
    tick(rig, settings, at(3000))
    # When its provider stops it (now: long after, the node is not live)
    with session_scope(db_url) as s:
        decision = request_stop(s, s.get(Account, rig.account_id), rig.worker_id, HEARTBEAT_S)
    # Then it ends at once, charged exactly up to the node's last heartbeat, not up to the stop
    assert not decision.tell_node
    assert worker_row(rig).status == WorkerStatus.STOPPED
    assert net_charged(rig) == exact((RUNTIME, START, HEARD))[0]
    check_books(db_url, rig.account_id)


def test_two_reconcilers_at_once_fail_a_lost_worker_once(db_url):
    import threading

    # Given a worker whose node went silent long ago (two beats run the reconciler: docs/operations.md)
    rig = make_worker(db_url, started_at=START)
    hear(rig, HEARD)
    found: list[list] = []

    def second() -> None:
        with session_scope(db_url) as s:
            found.append(fail_lost_workers(s, HEARTBEAT_S, at(7000)))

    # When a second reconciler runs while the first holds the worker, before the first commits
    with session_scope(db_url) as s:
        found.append(fail_lost_workers(s, HEARTBEAT_S, at(7000)))
        other = threading.Thread(target=second)
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive()  # it waits for the first one's transaction
    other.join(timeout=30)
    # Then only the first fails it (and asks for its replacement); the second finds it ended
    assert [[lost.worker_id for lost in run] for run in found] == [[rig.worker_id], []]
    assert net_charged(rig) == exact((RUNTIME, START, HEARD))[0]


def test_after_its_own_absence_the_reconciler_gives_nodes_a_window_before_declaring_any_lost(beat, monkeypatch):
    import time

    from cipherpool.names import RECONCILE_TASK

    # Given a worker whose node has been silent for long: the database was down (no node could
    # heartbeat, no reconcile could run), and the reconciler last ran 10 minutes ago
    (started,) = lifecycle.start_workers(beat.ctx, beat.app, beat.account_id, "m")
    lose(beat, started)
    now = time.time()
    monkeypatch.setattr(reconciler.beat_jobs, "last_runs", lambda _redis: {RECONCILE_TASK: now - 600})
    # When the reconciler runs again, it declares nothing lost: the nodes get one window to be heard
    assert reconciler.reconcile(beat.ctx, beat.app, now=now) == []
    assert worker_row_of(beat, started.id).status == WorkerStatus.PENDING
    # When it has been running meanwhile and the node is still silent, the node is lost
    monkeypatch.setattr(reconciler.beat_jobs, "last_runs", lambda _redis: {RECONCILE_TASK: now - 5})
    (lost,) = reconciler.reconcile(beat.ctx, beat.app, now=now)
    assert lost.worker_id == started.id and worker_row_of(beat, started.id).status == WorkerStatus.FAILED


def worker_row_of(beat, worker_id: str) -> Worker:
    with session_scope(beat.db) as s:
        return s.get(Worker, worker_id)
