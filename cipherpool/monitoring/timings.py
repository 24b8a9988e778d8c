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

Two more kinds of fields share the model's hashes; readers that do not know them skip them
(:func:`split_hash` takes only the tally's names):

* ``v:<version>:<name>`` in ``:all`` and ``:hist``: the same figures for the model version the
  query ran on (a node that knows it says so: :attr:`Record.version`), which ``/metrics``
  exports with a ``version`` label (:func:`version_tallies`, :func:`histogram_sets`). Written
  in the same MULTI as the model-wide figures, so a reader never sees one without the other.
* ``r:<code>`` in the minute hashes and ``:all``: requests the gateway refused for this model,
  by error code (:mod:`.refusals`), read with the window in the same round trip.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cipherpool.api.schemas import TimingFigures
from cipherpool.names import TIMINGS_PREFIX

if TYPE_CHECKING:  # in annotations only (monitoring.refusals, which a client's `worker stats` reads, imports this module)
    from redis import Redis

MINUTE_S = 60
MAX_WINDOW_S = 24 * 3600  # the longest window a reader may ask for
KEEP_MINUTES_S = MAX_WINDOW_S + 2 * 3600  # minute hashes expire after this (seconds)
KEEP_RECENT = 200  # latest queries kept per model (a worker's "current" looks among them)
SHARED = "shared"  # the worker id of queries computed on shared nodes
# Prometheus histogram bucket bounds, seconds: from a logistic regression's milliseconds to
# a bootstrapped model's minutes.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
US = 1_000_000
VERSION_FIELD = "v:"  # + version + ":" + name: a field counted for one model version
REFUSAL_FIELD = "r:"  # + error code: requests the gateway refused for the model (monitoring.refusals)
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
    key_hits: int = 0  # queries whose evaluation key was in the node's key cache
    key_misses: int = 0  # queries whose key was fetched and deserialized
    key_load_us: int = 0  # time those misses spent deserializing (and fetching) their keys
    routed_home: int = 0  # queries that reached their node through its key-affinity queue
    routed_any: int = 0  # queries that reached it through the model's queue while affinity was on (fallbacks)

    def add(self, other: Tally) -> None:
        for name in TALLY_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

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
            key_cache_hits=self.key_hits,
            key_cache_misses=self.key_misses,
            key_cache_hit_ratio=self.key_hits / lookups if (lookups := self.key_hits + self.key_misses) else None,
            average_key_load_s=self.key_load_us / self.key_misses / US if self.key_misses else None,
            affinity_routed=self.routed_home,
            affinity_fallbacks=self.routed_any,
            affinity_fallback_ratio=self.routed_any / routed if (routed := self.routed_home + self.routed_any) else None,
        )


TALLY_FIELDS = (
    "queries",
    "refused",
    "failed",
    "wait_us",
    "compute_us",
    "key_hits",
    "key_misses",
    "key_load_us",
    "routed_home",
    "routed_any",
)
KEY_BYTES_FIELD = "kb:"  # + node name, in ``:all``: the bytes of deserialized keys resident in that node's key cache


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


def _by_version(raw: dict[bytes, bytes]) -> dict[int, dict[str, int]]:
    """The ``v:<version>:<name>`` fields of a hash: version -> name -> value."""
    found: dict[int, dict[str, int]] = {}
    for name_b, value_b in raw.items():
        name = name_b.decode()
        if not name.startswith(VERSION_FIELD):
            continue
        version, _, part = name[len(VERSION_FIELD) :].partition(":")
        if version.isdigit() and part:
            fields = found.setdefault(int(version), {})
            fields[part] = fields.get(part, 0) + int(value_b)
    return found


def version_tallies(raw: dict[bytes, bytes]) -> dict[int, Tally]:
    """Per model version, the tally of an ``:all`` hash (queries recorded with their version)."""
    tallies = {}
    for version, fields in _by_version(raw).items():
        tallies[version] = Tally(**{name: fields.get(name, 0) for name in TALLY_FIELDS})
    return tallies


def key_bytes(raw: dict[bytes, bytes]) -> dict[str, int]:
    """The ``kb:<node>`` fields of an ``:all`` hash: resident key bytes per node, as each node
    last reported them (a gauge, set, never added to)."""
    found: dict[str, int] = {}
    for name_b, value_b in raw.items():
        name = name_b.decode()
        if name.startswith(KEY_BYTES_FIELD):
            found[name[len(KEY_BYTES_FIELD) :]] = int(value_b)
    return found


def refusal_counts(raw: dict[bytes, bytes]) -> dict[str, int]:
    """The ``r:<code>`` fields of a hash: requests the gateway refused, by error code."""
    found: dict[str, int] = {}
    for name_b, value_b in raw.items():
        name = name_b.decode()
        if name.startswith(REFUSAL_FIELD):
            code = name[len(REFUSAL_FIELD) :]
            found[code] = found.get(code, 0) + int(value_b)
    return found


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
    refusals_window: dict[str, int] = field(default_factory=dict)  # the gateway's refusals by error code
    refusals_all_time: dict[str, int] = field(default_factory=dict)
    key_bytes: dict[str, int] = field(default_factory=dict)  # node -> resident key bytes (its last report)

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
    window, per_worker, refused = Tally(), dict[str, Tally](), dict[str, int]()
    for raw in replies[: len(minutes)]:
        model, workers = split_hash(raw)
        window.add(model)
        for worker, tally in workers.items():
            per_worker.setdefault(worker, Tally()).add(tally)
        for code, n in refusal_counts(raw).items():
            refused[code] = refused.get(code, 0) + n
    all_time, all_workers = split_hash(replies[-2])
    recent = [Sample.decode(item) for item in replies[-1]]
    return ModelTimings(
        model_id,
        window_s,
        span,
        window,
        all_time,
        per_worker,
        all_workers,
        recent,
        refused,
        refusal_counts(replies[-2]),
        key_bytes(replies[-2]),
    )


@dataclass(frozen=True)
class Histogram:
    """Cumulative Prometheus buckets of one model's queue wait or compute times."""

    buckets: list[tuple[str, int]]  # (le, cumulative count), ending with +Inf
    sum_s: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1]


HISTOGRAM_PARTS = ("queue_wait", "compute")


def _cumulate(raw: dict[str, int]) -> dict[str, Histogram]:
    """Cumulative histograms of the raw fields (``<part>:<bucket index>``, ``<part>:sum_us``)."""
    found = {}
    for part in HISTOGRAM_PARTS:
        running, buckets = 0, []
        for i, bound in enumerate((*BUCKETS_S, math.inf)):
            running += raw.get(f"{part}:{i}", 0)
            buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
        found[part] = Histogram(buckets, raw.get(f"{part}:sum_us", 0) / US)
    return found


def histograms(redis: Redis, model_id: str) -> dict[str, Histogram]:
    """``{"queue_wait": ..., "compute": ...}`` of one model, all-time."""
    raw = {k.decode(): int(v) for k, v in redis.hgetall(histogram_key(model_id)).items()}  # type: ignore[union-attr]
    return _cumulate(raw)


@dataclass(frozen=True)
class HistogramSet:
    """One model's histograms, all-time: every query's, each model version's, and the rest
    (queries recorded with no version: before versions were recorded, or by a node that did
    not know it); each query is in ``total`` and in exactly one of the others."""

    total: dict[str, Histogram]
    versions: dict[int, dict[str, Histogram]]
    unversioned: dict[str, Histogram]


def histogram_sets(redis: Redis, model_id: str) -> HistogramSet:
    """:func:`histograms`, with each version's apart (one read of the same hash)."""
    raw: dict[bytes, bytes] = redis.hgetall(histogram_key(model_id))  # type: ignore[assignment]
    total = {k.decode(): int(v) for k, v in raw.items() if not k.startswith(VERSION_FIELD.encode())}
    versions = _by_version(raw)
    rest = dict(total)
    for fields in versions.values():
        for name, value in fields.items():
            rest[name] = max(0, rest.get(name, 0) - value)  # written in one MULTI: never below 0 unless edited by hand
    return HistogramSet(_cumulate(total), {v: _cumulate(f) for v, f in versions.items()}, _cumulate(rest))


@dataclass(frozen=True)
class Record:
    """One query's additions, as a node hook hands them to :func:`write`."""

    at: float
    model_id: str
    adds: dict[str, int]
    sample: Sample | None = None
    histogram: dict[str, int] | None = None
    version: int | None = None  # the model version it ran on, when the node knows it
    gauges: dict[str, int | None] | None = (
        None  # fields of the model's ``:all`` hash set, not added to (``kb:<node>``); None: removed
    )


def _add(sums: dict[tuple[str, str], int], key: str, name: str, value: int) -> None:
    sums[(key, name)] = sums.get((key, name), 0) + value


def write(redis: Redis, records: list[Record]) -> None:
    """Add queries' figures to their models' minute, all-time, histogram and latest-queries
    keys, in one round trip (additions to one field summed first). One MULTI: a reader sees
    a version's figures exactly when it sees the model-wide ones they are part of."""
    sums: dict[tuple[str, str], int] = {}
    gauges: dict[tuple[str, str], int | None] = {}
    buckets: set[str] = set()
    for r in records:
        for name, value in (r.gauges or {}).items():
            gauges[(total_key(r.model_id), name)] = value  # the latest record's value wins
        bucket = minute_key(r.model_id, math.floor(r.at / MINUTE_S))
        buckets.add(bucket)
        versioned = f"{VERSION_FIELD}{r.version}:" if r.version is not None else None
        for name, value in r.adds.items():
            for key in (bucket, total_key(r.model_id)):
                _add(sums, key, name, value)
            if versioned and not name.startswith("w:"):  # the model's figures per version, not each worker's
                _add(sums, total_key(r.model_id), versioned + name, value)
        for name, value in (r.histogram or {}).items():
            _add(sums, histogram_key(r.model_id), name, value)
            if versioned:
                _add(sums, histogram_key(r.model_id), versioned + name, value)
    with redis.pipeline(transaction=True) as pipe:
        for (key, name), value in sums.items():
            pipe.hincrby(key, name, value)
        for (key, name), value in gauges.items():
            if value is None:
                pipe.hdel(key, name)  # never recreates the hash of a model forgotten meanwhile
            else:
                pipe.hset(key, name, value)
        for bucket in buckets:
            pipe.expire(bucket, KEEP_MINUTES_S)
        for model_id in {r.model_id for r in records if r.sample}:
            samples = [r.sample.encode() for r in records if r.sample and r.model_id == model_id]
            pipe.lpush(recent_key(model_id), *samples)  # the newest ends first
            pipe.ltrim(recent_key(model_id), 0, KEEP_RECENT - 1)
        pipe.execute()


def count_refused(redis: Redis, model_id: str, at: float | None = None, version: int | None = None) -> None:
    """One of the caller's errors that the gateway refused before any node saw it (a
    ciphertext that cannot be evaluated): counted with the model's refusals, on no worker."""
    write(redis, [Record(time.time() if at is None else at, model_id, {"refused": 1}, version=version)])


def forget(redis: Redis, model_id: str) -> None:
    """Drop a model's all-time figures, histogram and latest queries (minutes expire alone)."""
    redis.delete(total_key(model_id), recent_key(model_id), histogram_key(model_id))
