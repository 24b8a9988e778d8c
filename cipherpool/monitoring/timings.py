"""Query times per model and worker: recorded by a node hook in Redis
(:class:`cipherpool.workers.timings.QueryTimings`), read by everyone else.

Every figure a provider watches (average and current query time, queue wait apart from
compute, queries per minute, error and refusal rates), what alerts compare with their
thresholds, what the autoscaler decides on and what the gateway exports to Prometheus come
from here, so they can never disagree.

Why Redis and minute buckets: a node must not write to the database per query, and the
readers sit in other processes (gateway, beat's jobs). Each query adds to one hash per model
and minute (``cipherpool:qt:<model>:<minute>``; model-wide fields and ``w:<worker>:<field>``
per worker), to the model's all-time hash (``:all``), to its histogram (``:hist``, the
Prometheus buckets) and to a capped list of its latest queries (``:recent``). A window is the
minutes that overlap it: the figures are exact sums over whole minutes, so a 5-minute window
read at 10:02:30 covers 09:57:00–10:02:30 (``span_s`` says how long that was: between the
window and a minute more, never less, so a 1-minute window read just after a minute turned
still holds a minute of queries). Times are
summed in integer microseconds, so sums are exact however many queries add to them.

Counters are kept apart for ``queries`` (computed), ``refused`` (the caller's errors, typed: a
malformed or unevaluable ciphertext, a wrong key; counted by the node, or by the gateway when
it refused the ciphertext before publishing it: :func:`count_refused`) and ``failed`` (the
platform's: unexpected errors, and typed failures of its own such as the store out of reach).
The error rate is ``failed / (queries + failed)``: what callers send wrong never moves it, so
a caller cannot raise a provider's error rate (and set off its alerts) nor hide failures
under refusals; the refusal rate is ``refused`` over all three, so a provider still sees them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from redis import Redis

from cipherpool.api.schemas import TimingFigures
from cipherpool.names import TIMINGS_PREFIX

MINUTE_S = 60
MAX_WINDOW_S = 24 * 3600  # the longest window a reader may ask for
KEEP_MINUTES_S = MAX_WINDOW_S + 2 * 3600  # minute hashes expire after this (seconds)
KEEP_RECENT = 200  # latest queries kept per model (a worker's "current" looks among them)
SHARED = "shared"  # the worker id of queries computed on shared nodes
# Prometheus histogram bucket bounds, seconds: from a logistic regression's milliseconds to
# a bootstrapped model's minutes.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
US = 1_000_000
log = logging.getLogger("cipherpool.monitoring")


def minute_key(model_id: str, minute: int) -> str:
    return f"{TIMINGS_PREFIX}{model_id}:{minute}"


def total_key(model_id: str) -> str:
    return f"{TIMINGS_PREFIX}{model_id}:all"


def recent_key(model_id: str) -> str:
    return f"{TIMINGS_PREFIX}{model_id}:recent"


def histogram_key(model_id: str) -> str:
    return f"{TIMINGS_PREFIX}{model_id}:hist"


def bucket_index(seconds: float) -> int:
    """The first bucket whose bound holds ``seconds`` (``len(BUCKETS_S)``: above them all)."""
    for i, bound in enumerate(BUCKETS_S):
        if seconds <= bound:
            return i
    return len(BUCKETS_S)


@dataclass
class Tally:
    """Sums over a span: what the hashes hold, added up."""

    queries: int = 0
    refused: int = 0
    failed: int = 0
    wait_us: int = 0
    compute_us: int = 0

    def add(self, other: Tally) -> None:
        self.queries += other.queries
        self.refused += other.refused
        self.failed += other.failed
        self.wait_us += other.wait_us
        self.compute_us += other.compute_us

    @property
    def attempts(self) -> int:
        return self.queries + self.refused + self.failed

    def figures(self, span_s: float | None = None) -> TimingFigures:
        """Averages and rates over the span (None where nothing was counted to average)."""
        n, attempts = self.queries, self.attempts
        return TimingFigures(
            queries=n,
            refused=self.refused,
            failed=self.failed,
            average_query_s=(self.wait_us + self.compute_us) / n / US if n else None,
            average_compute_s=self.compute_us / n / US if n else None,
            average_queue_wait_s=self.wait_us / n / US if n else None,
            queries_per_minute=n * MINUTE_S / span_s if span_s else None,
            error_rate=self.failed / (n + self.failed) if n + self.failed else None,
            refusal_rate=self.refused / attempts if attempts else None,
        )


TALLY_FIELDS = ("queries", "refused", "failed", "wait_us", "compute_us")


def split_hash(raw: dict[bytes, bytes]) -> tuple[Tally, dict[str, Tally]]:
    """A bucket hash as the model's tally and each worker's (fields ``w:<worker>:<name>``)."""
    model, workers = Tally(), dict[str, Tally]()
    for name_b, value_b in raw.items():
        name, value = name_b.decode(), int(value_b)
        if name.startswith("w:"):
            worker, _, part = name[2:].rpartition(":")
            target = workers.setdefault(worker, Tally())
        else:
            part, target = name, model
        if part in TALLY_FIELDS:
            setattr(target, part, getattr(target, part) + value)
    return model, workers


@dataclass(frozen=True)
class Sample:
    """One computed query, as the ``recent`` list keeps it."""

    at: float  # epoch seconds when it was computed
    worker: str
    queue_wait_s: float
    compute_s: float

    @property
    def query_s(self) -> float:
        return self.queue_wait_s + self.compute_s

    def encode(self) -> str:
        return json.dumps([round(self.at, 3), self.worker, round(self.queue_wait_s, 6), round(self.compute_s, 6)])

    @classmethod
    def decode(cls, raw: bytes | str) -> Sample:
        at, worker, wait, compute = json.loads(raw)
        return cls(float(at), str(worker), float(wait), float(compute))


@dataclass(frozen=True)
class Current:
    """The latest queries' figures: what "current query time" means (the last ``queries``)."""

    queries: int
    average_query_s: float | None
    average_compute_s: float | None
    average_queue_wait_s: float | None
    latest_query_s: float | None
    latest_at: float | None


def current(samples: Iterable[Sample], last: int, worker: str | None = None) -> Current:
    """Averages of the ``last`` newest samples (newest first), of one worker if given."""
    chosen = [s for s in samples if worker is None or s.worker == worker][: max(0, last)]
    if not chosen:
        return Current(0, None, None, None, None, None)
    n = len(chosen)
    return Current(
        queries=n,
        average_query_s=sum(s.query_s for s in chosen) / n,
        average_compute_s=sum(s.compute_s for s in chosen) / n,
        average_queue_wait_s=sum(s.queue_wait_s for s in chosen) / n,
        latest_query_s=chosen[0].query_s,
        latest_at=chosen[0].at,
    )


@dataclass
class ModelTimings:
    """One model's recorded times: over a window, all-time, and its latest queries."""

    model_id: str
    window_s: int
    span_s: float  # what the window's minutes actually covered, up to now
    window: Tally
    all_time: Tally
    workers_window: dict[str, Tally] = field(default_factory=dict)
    workers_all_time: dict[str, Tally] = field(default_factory=dict)
    recent: list[Sample] = field(default_factory=list)  # newest first

    def window_figures(self, worker: str | None = None) -> TimingFigures:
        tally = self.window if worker is None else self.workers_window.get(worker, Tally())
        return tally.figures(self.span_s)

    def all_time_figures(self, worker: str | None = None) -> TimingFigures:
        tally = self.all_time if worker is None else self.workers_all_time.get(worker, Tally())
        return tally.figures()

    def current(self, last: int, worker: str | None = None) -> Current:
        return current(self.recent, last, worker)

    @property
    def workers(self) -> set[str]:
        return set(self.workers_window) | set(self.workers_all_time)


def window_minutes(now: float, window_s: int) -> tuple[list[int], float]:
    """The minutes (epoch // 60) that overlap ``(now - window_s, now]``, and the span they cover."""
    if not 1 <= window_s <= MAX_WINDOW_S:
        raise ValueError(f"a window is between 1 s and {MAX_WINDOW_S} s, not {window_s}")
    last = math.floor(now / MINUTE_S)
    first = math.floor((now - window_s) / MINUTE_S)  # the minute the window begins in, whole
    return list(range(first, last + 1)), now - first * MINUTE_S


def read(redis: Redis, model_id: str, window_s: int, now: float | None = None) -> ModelTimings:
    """A model's times over the last ``window_s`` seconds (whole minutes), all-time and latest."""
    now = time.time() if now is None else now
    minutes, span = window_minutes(now, window_s)
    with redis.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(minute_key(model_id, minute))
        pipe.hgetall(total_key(model_id))
        pipe.lrange(recent_key(model_id), 0, KEEP_RECENT - 1)
        replies = pipe.execute()
    window, per_worker = Tally(), dict[str, Tally]()
    for raw in replies[: len(minutes)]:
        model, workers = split_hash(raw)
        window.add(model)
        for worker, tally in workers.items():
            per_worker.setdefault(worker, Tally()).add(tally)
    all_time, all_workers = split_hash(replies[-2])
    recent = [Sample.decode(item) for item in replies[-1]]
    return ModelTimings(model_id, window_s, span, window, all_time, per_worker, all_workers, recent)


@dataclass(frozen=True)
class Histogram:
    """Cumulative Prometheus buckets of one model's queue wait or compute times."""

    buckets: list[tuple[str, int]]  # (le, cumulative count), ending with +Inf
    sum_s: float


def histograms(redis: Redis, model_id: str) -> dict[str, Histogram]:
    """``{"queue_wait": ..., "compute": ...}`` of one model, all-time."""
    raw = {k.decode(): int(v) for k, v in redis.hgetall(histogram_key(model_id)).items()}  # type: ignore[union-attr]
    found = {}
    for part in ("queue_wait", "compute"):
        running, buckets = 0, []
        for i, bound in enumerate((*BUCKETS_S, math.inf)):
            running += raw.get(f"{part}:{i}", 0)
            buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
        found[part] = Histogram(buckets, raw.get(f"{part}:sum_us", 0) / US)
    return found


@dataclass(frozen=True)
class Record:
    """One query's additions, as a node hook hands them to :func:`write`."""

    at: float
    model_id: str
    adds: dict[str, int]
    sample: Sample | None = None
    histogram: dict[str, int] | None = None


def write(redis: Redis, records: list[Record]) -> None:
    """Add queries' figures to their models' minute, all-time, histogram and latest-queries
    keys, in one pipelined round trip (additions to one field summed first)."""
    sums: dict[tuple[str, str], int] = {}
    buckets: set[str] = set()
    for r in records:
        bucket = minute_key(r.model_id, math.floor(r.at / MINUTE_S))
        buckets.add(bucket)
        for name, value in r.adds.items():
            for key in (bucket, total_key(r.model_id)):
                sums[(key, name)] = sums.get((key, name), 0) + value
        for name, value in (r.histogram or {}).items():
            sums[(histogram_key(r.model_id), name)] = sums.get((histogram_key(r.model_id), name), 0) + value
    with redis.pipeline(transaction=False) as pipe:
        for (key, name), value in sums.items():
            pipe.hincrby(key, name, value)
        for bucket in buckets:
            pipe.expire(bucket, KEEP_MINUTES_S)
        for model_id in {r.model_id for r in records if r.sample}:
            samples = [r.sample.encode() for r in records if r.sample and r.model_id == model_id]
            pipe.lpush(recent_key(model_id), *samples)  # the newest ends first
            pipe.ltrim(recent_key(model_id), 0, KEEP_RECENT - 1)
        pipe.execute()


def count_refused(redis: Redis, model_id: str, at: float | None = None) -> None:
    """One of the caller's errors that the gateway refused before any node saw it (a
    ciphertext that cannot be evaluated): counted with the model's refusals, on no worker."""
    write(redis, [Record(time.time() if at is None else at, model_id, {"refused": 1})])


def forget(redis: Redis, model_id: str) -> None:
    """Drop a model's all-time figures, histogram and latest queries (minutes expire alone)."""
    redis.delete(total_key(model_id), recent_key(model_id), histogram_key(model_id))
