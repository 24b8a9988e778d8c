"""What is owed, and charging it exactly once.

**Runtime.** A worker is charged from the moment it is up or on standby (``started_at``, so a
load that fails costs nothing) until it stops, at its node's rate for its state: the runtime
rate while up (or stopping: still finishing queries), the standby rate on standby. Charging a
worker means charging ``[billed_to, until)``: :func:`settle` locks the worker's row first, so
a second settle of the same worker (another beat, a stop at that instant) waits and then
starts where the first stopped; and each line is keyed ``worker:<id>:<period start in µs>``, so even
without the lock the database refuses a period charged twice. A tick that dies before its
commit charged nothing, and the next one starts from the same ``billed_to``: no interval is
skipped. Beat's tick settles every running worker; a stop, a standby or a resume settles the
worker at that moment, in the same transaction as the change, so each part of the time is
priced at its own state's rate.

**Silence is not charged.** A node's heartbeat (``PoolNode.last_seen``) is the evidence that
its worker runs, so the tick charges a worker holding its node no further than that (the
next tick goes on from there once the node is heard again): a node that died is never
charged past its last heartbeat, however long the reconciler takes to notice. A stop, a
standby or a resume is the node's (or the service's) own moment and is charged up to it.
When a node turns out to have been silent (lost, or restarted and registering again),
:func:`skip_silence` charges up to its last heartbeat, gives back what was charged after it
(a ``refund`` line keyed ``worker:<id>:refund:<last heartbeat in µs>``, once), and moves
``billed_to`` past the silence without charging it.

**Exact arithmetic.** Amounts are micro-credits; a rate is micro-credits per hour and time is
counted in milliseconds, so a period costs ``rate × ms / 3 600 000``, rarely a whole number.
The fraction left over is carried on the worker (``billed_remainder``) into its next charge:
however the ticks fall, a worker's charges add up to exactly ``⌊Σ rate × ms / 3 600 000⌋``.
A refund keeps this exact: it takes the time refunded out of that sum (remainder included), so
what is left charged is ``⌊Σ rate × ms / 3 600 000⌋`` over the time not refunded.
Periods are cut at UTC midnight (usage is reported per day) and where a price changed.

**Shared nodes.** Nodes count each account's computation per model and minute in Redis
(:class:`~cipherpool.workers.shared.ExecutionMeter`). The tick charges each finished minute as
one line keyed ``exec:<account>:<model>:<profile>:<minute>``, at the price in force in that
minute, then forgets the minute; a crash in between leaves the minute to the next tick, whose
line the database refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from redis import Redis
from sqlalchemy import ColumnElement, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from cipherpool import backends
from cipherpool.billing import ledger
from cipherpool.billing.money import MS_PER_HOUR, MS_PER_S, show
from cipherpool.billing.rates import prices_at, segments, sync_settings
from cipherpool.clock import aware, utcnow
from cipherpool.config.settings import Settings
from cipherpool.db.tables import LedgerEntry, Model, PoolNode, Worker
from cipherpool.names import SHARED_BUCKET_PREFIX, SHARED_PENDING_KEY
from cipherpool.statuses import HOLDING_NODE, LedgerKind, WorkerStatus

log = logging.getLogger("cipherpool.billing")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BUCKET_S = 60  # shared execution is tallied per minute
BUCKET_GRACE_S = 5.0  # a minute is charged once it ended this long ago (queries finishing late in it)

Charged = Callable[[LedgerEntry], None]


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, rounded down: differences of these add up exactly."""
    return (aware(moment) - EPOCH) // timedelta(milliseconds=1)


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch: the resolution of a stored time, so two periods that
    start apart always have keys apart (two settles within a millisecond, a tick just past
    midnight)."""
    return (aware(moment) - EPOCH) // timedelta(microseconds=1)


def days(start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """``[start, end)`` cut at each UTC midnight."""
    while start < end:
        midnight = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=1)
        yield start, min(end, midnight)
        start = midnight


def runtime_kind(worker: Worker) -> LedgerKind:
    return LedgerKind.STANDBY if worker.status == WorkerStatus.STANDBY else LedgerKind.RUNTIME


def lock_worker(session: Session, worker_id: str) -> Worker | None:
    """The worker's row, locked for this transaction and read fresh (after any settle that held it)."""
    session.execute(update(Worker).where(col(Worker.id) == worker_id).values(billed_remainder=col(Worker.billed_remainder)))
    return session.exec(select(Worker).where(Worker.id == worker_id).execution_options(populate_existing=True)).first()


def settle(
    session: Session, worker_id: str, until: datetime | None = None, *, settings: Settings | None = None, heard: bool = False
) -> list[LedgerEntry]:
    """Charge the worker from where it was last charged to ``until`` (now; at most its stop),
    at its current state's rate; in the caller's transaction. Returns the lines added.

    ``heard``: beat's tick, which charges a worker holding its node only up to the node's last
    heartbeat (the time after it may be silence: a node that died). Not for a stop, a standby
    or a resume: they happen at their own moment, which is charged."""
    worker = lock_worker(session, worker_id)
    if worker is None or worker.started_at is None:
        return []
    start = aware(worker.billed_to or worker.started_at)
    end = aware(until or utcnow())
    if worker.stopped_at is not None:
        end = min(end, aware(worker.stopped_at))
    elif heard:
        end = min(end, last_heard(session, worker) or end)
    if end <= start:
        if worker.stopped_at is not None and worker.billed_to is None:
            worker.billed_to = start  # stopped as it started: nothing owed, nothing to look at again
            session.add(worker)
        return []
    host_class, profile = priced_as(session, worker)
    kind = runtime_kind(worker)
    remainder, entries = int(worker.billed_remainder or 0), []
    for day_start, day_end in days(start, end):
        numerator, ms_total, rate = price(session, host_class, profile, kind, day_start, day_end, settings)
        amount, remainder = divmod(remainder + numerator, MS_PER_HOUR)
        entry = ledger.append(
            session,
            worker.account_id,
            kind,
            -amount,
            f"worker:{worker.id}:{epoch_us(day_start)}",
            model_id=worker.model_id,
            worker_id=worker.id,
            node=worker.node_name,
            period_start=day_start,
            period_end=day_end,
            quantity_ms=ms_total,
            rate=rate,
            note=f"{'standby' if kind == LedgerKind.STANDBY else 'runtime'} of worker {worker.id} "
            f"on {worker.node_name} ({show(rate)} credits/h)",
        )
        if entry is None:  # charged already from here (only possible without the row lock)
            log.warning("worker %s: period from %s was charged already", worker.id, day_start.isoformat())
            break
        entries.append(entry)
        worker.billed_to, worker.billed_remainder = day_end, remainder
    session.add(worker)
    return entries


def last_heard(session: Session, worker: Worker) -> datetime | None:
    """The last heartbeat of the node a worker holds (None: it holds none, or the node is gone)."""
    if worker.status not in HOLDING_NODE:
        return None
    node = session.get(PoolNode, worker.node_name)
    return aware(node.last_seen) if node is not None else None


def priced_as(session: Session, worker: Worker) -> tuple[str, str | None]:
    """The host class and profile whose prices a worker pays: its node's (its model's class if
    the node is gone)."""
    node = session.get(PoolNode, worker.node_name)
    if node is not None:
        return node.host_class, node.profile
    model = session.get(Model, worker.model_id)
    return (model.hardware if model else backends.DEFAULT_HOST_CLASS), None


def price(
    session: Session,
    host_class: str,
    profile: str | None,
    kind: LedgerKind,
    start: datetime,
    end: datetime,
    settings: Settings | None = None,
) -> tuple[int, int, int]:
    """``[start, end)`` (within one day) at the ``kind``'s prices in force piece by piece:
    ``Σ rate × ms`` (micro-credit-milliseconds per hour, to be divided by one hour), the
    milliseconds, and the last piece's rate (what a line shows)."""
    numerator, ms_total, rate = 0, 0, 0
    for a, b, prices in segments(session, host_class, profile, start, end, settings):
        rate = prices.standby_per_hour if kind == LedgerKind.STANDBY else prices.runtime_per_hour
        ms = epoch_ms(b) - epoch_ms(a)
        numerator += rate * ms
        ms_total += ms
    return numerator, ms_total, rate


def skip_silence(
    session: Session, worker_id: str, heard: datetime, resumed: datetime, *, settings: Settings | None = None
) -> list[LedgerEntry]:
    """The worker's node was silent from its last heartbeat ``heard`` until ``resumed`` (it was
    lost, or restarted and registered again): charge up to ``heard``, give back anything
    charged after it (by a stop or a standby of that moment, or an older version's tick), and
    owe nothing until ``resumed``. In the caller's transaction; the lines added."""
    entries = settle(session, worker_id, heard, settings=settings)
    refund = refund_after(session, worker_id, heard, settings=settings)
    worker = session.get(Worker, worker_id)
    running = worker is not None and worker.started_at is not None and worker.stopped_at is None
    if worker is not None and running and (worker.billed_to is None or aware(worker.billed_to) < aware(resumed)):
        worker.billed_to = aware(resumed)  # the silence is not owed
        session.add(worker)
    return entries + ([refund] if refund is not None else [])


def refund_after(session: Session, worker_id: str, moment: datetime, *, settings: Settings | None = None) -> LedgerEntry | None:
    """Give back what the worker was charged for its time after ``moment``, as one ``refund``
    line keyed by the worker and ``moment`` (so never twice). The time refunded comes out of
    the exact sum with its fraction: ``billed_remainder`` becomes what it would be had the
    worker been charged up to ``moment`` only. ``billed_to`` stays where it was (that time is
    accounted for); the caller moves it past the silence. None if nothing was charged after."""
    worker = lock_worker(session, worker_id)
    moment = aware(moment)
    if worker is None or worker.billed_to is None or aware(worker.billed_to) <= moment:
        return None
    numerator, ms_total, rate = charged_after(session, worker, moment, settings)
    if ms_total <= 0:
        return None
    left = int(worker.billed_remainder or 0) - numerator
    amount, remainder = -(left // MS_PER_HOUR), left % MS_PER_HOUR
    entry = ledger.append(
        session,
        worker.account_id,
        LedgerKind.REFUND,
        amount,
        f"worker:{worker.id}:refund:{epoch_us(moment)}",
        model_id=worker.model_id,
        worker_id=worker.id,
        node=worker.node_name,
        period_start=moment,
        period_end=aware(worker.billed_to),
        quantity_ms=ms_total,
        rate=rate,
        note=f"worker {worker.id} was charged {ms_total} ms past the last heartbeat of {worker.node_name}: given back",
    )
    if entry is None:  # refunded already (only possible without the row lock)
        return None
    worker.billed_remainder = remainder
    session.add(worker)
    log.info("worker %s: %d micro-credits charged past its node's last heartbeat given back", worker.id, amount)
    return entry


def charged_after(session: Session, worker: Worker, moment: datetime, settings: Settings | None = None) -> tuple[int, int, int]:
    """What the worker's runtime and standby lines charged for their time after ``moment``:
    ``Σ rate × ms`` as :func:`price` counts it (so it is exactly what those lines added to the
    sum), the milliseconds, and the last rate."""
    lines = session.exec(
        select(LedgerEntry)
        .where(
            LedgerEntry.worker_id == worker.id,
            col(LedgerEntry.kind).in_([LedgerKind.RUNTIME.value, LedgerKind.STANDBY.value]),
            col(LedgerEntry.period_end) > moment,
        )
        .order_by(col(LedgerEntry.id))
    ).all()
    host_class, profile = priced_as(session, worker)
    numerator, ms_total, rate = 0, 0, 0
    for line in lines:
        if line.period_start is None or line.period_end is None:
            continue
        start = max(aware(line.period_start), moment)
        part, ms, rate = price(session, host_class, profile, LedgerKind(line.kind), start, aware(line.period_end), settings)
        numerator, ms_total = numerator + part, ms_total + ms
    return numerator, ms_total, rate


def unbilled_workers(session: Session, now: datetime | None = None) -> list[str]:
    """Workers that owe something before ``now``: started and still holding a node (heard from
    since they were last charged), or stopped with time not yet charged (their stop's own
    charge was refused, or it died with its process)."""
    holding: ColumnElement[bool] = col(Worker.status).in_(HOLDING_NODE)
    if now is not None:  # and owing time its node was heard in (see settle's ``heard``)
        holding = holding & (
            col(Worker.billed_to).is_(None)
            | (
                (col(Worker.billed_to) < now)
                & (col(PoolNode.last_seen).is_(None) | (col(Worker.billed_to) < col(PoolNode.last_seen)))
            )
        )
    rows = session.exec(
        select(Worker.id, Worker.status, Worker.stopped_at)
        .outerjoin(PoolNode, col(PoolNode.name) == Worker.node_name)
        .where(
            col(Worker.started_at).is_not(None),
            holding
            | (
                col(Worker.stopped_at).is_not(None)
                & (col(Worker.billed_to).is_(None) | (col(Worker.billed_to) < col(Worker.stopped_at)))
            ),
        )
    ).all()
    return [row[0] for row in rows]


# -- shared nodes -------------------------------------------------------------------------


def bucket_of(moment: float) -> int:
    return int(moment // BUCKET_S)


def record_execution(redis: Redis, account_id: str, model_id: str, profile: str, compute_s: float, moment: float) -> None:
    """Add one computed query to its account's minute (what a shared node's meter does)."""
    minute = bucket_of(moment)
    key = f"{SHARED_BUCKET_PREFIX}{account_id}:{minute}"
    with redis.pipeline() as pipe:
        pipe.hincrby(key, f"{model_id}:{profile}:ms", max(0, round(compute_s * MS_PER_S)))
        pipe.hincrby(key, f"{model_id}:{profile}:queries", 1)
        pipe.expire(key, 7 * 24 * 3600)
        pipe.sadd(SHARED_PENDING_KEY, f"{account_id}:{minute}")
        pipe.execute()


@dataclass
class ExecutionCharge:
    account_id: str
    model_id: str
    profile: str
    minute: int
    ms: int
    queries: int


def finished_minutes(redis: Redis, now: datetime) -> list[tuple[str, int]]:
    """Minutes of shared execution not charged yet and over (by :data:`BUCKET_GRACE_S`)."""
    cutoff = bucket_of(now.timestamp() - BUCKET_GRACE_S)  # minutes before this one are over
    members: set[bytes] = redis.smembers(SHARED_PENDING_KEY)  # type: ignore[assignment]
    due = []
    for member in members:
        account_id, _, minute = member.decode().rpartition(":")
        if minute.isdigit() and int(minute) < cutoff:
            due.append((account_id, int(minute)))
    return sorted(due, key=lambda m: (m[1], m[0]))


def read_minute(redis: Redis, account_id: str, minute: int) -> list[ExecutionCharge]:
    raw: dict[bytes, bytes] = redis.hgetall(f"{SHARED_BUCKET_PREFIX}{account_id}:{minute}")  # type: ignore[assignment]
    found: dict[tuple[str, str], ExecutionCharge] = {}
    for name, value in raw.items():
        model_id, profile, what = name.decode().split(":", 2)
        charge = found.setdefault((model_id, profile), ExecutionCharge(account_id, model_id, profile, minute, 0, 0))
        if what == "ms":
            charge.ms = int(value)
        elif what == "queries":
            charge.queries = int(value)
    return list(found.values())


def charge_execution(session: Session, charge: ExecutionCharge, settings: Settings | None = None) -> LedgerEntry | None:
    """One account's shared computation for one model in one minute, at that minute's price."""
    model = session.get(Model, charge.model_id)
    start = EPOCH + timedelta(seconds=charge.minute * BUCKET_S)
    prices = prices_at(session, model.hardware if model else backends.DEFAULT_HOST_CLASS, charge.profile or None, start, settings)
    amount = charge.ms * prices.execution_per_s // MS_PER_S
    return ledger.append(
        session,
        charge.account_id,
        LedgerKind.EXECUTION,
        -amount,
        f"exec:{charge.account_id}:{charge.model_id}:{charge.profile}:{charge.minute}",
        model_id=charge.model_id,
        node=None,
        period_start=start,
        period_end=start + timedelta(seconds=BUCKET_S),
        quantity_ms=charge.ms,
        queries=charge.queries,
        rate=prices.execution_per_s,
        note=f"{charge.queries} shared-node quer{'y' if charge.queries == 1 else 'ies'}, {charge.ms} ms of computation "
        f"({show(prices.execution_per_s)} credits/s)",
    )


# -- the tick -----------------------------------------------------------------------------


@dataclass
class TickReport:
    """What one tick did (beat logs it; tests read it)."""

    charged: list[LedgerEntry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return -sum(e.amount for e in self.charged)


def charge_all(
    session_factory: Callable[[], AbstractContextManager[Session]],
    redis: Redis | None,
    settings: Settings,
    now: datetime | None = None,
    on_charged: Charged | None = None,
) -> TickReport:
    """Charge every worker that owes time (up to ``now``, or its node's last heartbeat if
    earlier) and every finished minute of shared computation, each in a transaction of its own
    (one that fails is retried by the next tick)."""
    now = now or utcnow()
    report = TickReport()
    with session_factory() as session:
        sync_settings(session, settings, now)
        worker_ids = unbilled_workers(session, now)
    for worker_id in worker_ids:
        try:
            with session_factory() as session:
                entries = settle(session, worker_id, now, settings=settings, heard=True)
                for entry in entries:
                    if on_charged is not None:
                        on_charged(entry)
                report.charged += entries
        except Exception as exc:  # noqa: BLE001 - a lock timeout, a lost connection: the next tick charges it
            log.warning("could not charge worker %s this tick: %s", worker_id, exc, exc_info=not isinstance(exc, DBAPIError))
            report.errors.append(f"worker {worker_id}: {type(exc).__name__}")
    if redis is not None:
        for account_id, minute in finished_minutes(redis, now):
            try:
                with session_factory() as session:
                    for charge in read_minute(redis, account_id, minute):
                        line = charge_execution(session, charge, settings)
                        if line is not None:
                            if on_charged is not None:
                                on_charged(line)
                            report.charged.append(line)
                redis.srem(SHARED_PENDING_KEY, f"{account_id}:{minute}")  # committed (or charged before): done
            except Exception as exc:  # noqa: BLE001 - left pending: the next tick tries again
                log.warning(
                    "could not charge shared execution of %s, minute %d: %s",
                    account_id,
                    minute,
                    exc,
                    exc_info=not isinstance(exc, DBAPIError),
                )
                report.errors.append(f"execution {account_id}:{minute}: {type(exc).__name__}")
    return report
