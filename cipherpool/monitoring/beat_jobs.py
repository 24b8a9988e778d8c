"""Beat's jobs and when each last ran: the proof that the platform's periodic work happens.

Billing, reconcile, schedules, alerts and autoscale run only because beat sends their ticks
and a control worker runs them. Each control task records, when it finishes, the unix time
under its task name in one Redis hash (:data:`~cipherpool.names.BEAT_JOBS_KEY`); a reader
compares each age with the job's interval. A dead beat, a dead control worker or a job that
fails every time all show the same way: the job's age grows. (A task that raises records
nothing: a billing that fails every minute is as bad as none.)

The jobs and their intervals are read from the Celery configuration's beat schedule
(:func:`cipherpool.config.celery.celery_config`), so a job added there is watched here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis import Redis

from cipherpool.config.celery import celery_config
from cipherpool.config.settings import Settings
from cipherpool.names import BEAT_JOBS_KEY

NO_BROKER = "memory://"  # only the schedule is read from the configuration, never the broker


@dataclass(frozen=True)
class BeatJob:
    name: str  # the beat schedule's entry: reconcile, billing, ...
    task: str  # the task it sends, the field its runs are recorded under
    interval_s: float


def schedule(settings: Settings) -> list[BeatJob]:
    """Beat's jobs, as these settings schedule them."""
    conf = celery_config(settings.model_copy(update={"broker_url": settings.broker_url or NO_BROKER}))
    return [BeatJob(name, entry["task"], float(entry["schedule"])) for name, entry in conf["beat_schedule"].items()]


def record_run(redis: Redis, task: str, now: float) -> None:
    """The task ``task`` finished at ``now`` (unix seconds)."""
    redis.hset(BEAT_JOBS_KEY, task, repr(now))


def last_runs(redis: Redis) -> dict[str, float]:
    """Task name -> unix time its last run finished."""
    raw = cast(dict[bytes, bytes], redis.hgetall(BEAT_JOBS_KEY))
    runs = {}
    for task, value in raw.items():
        try:
            runs[task.decode()] = float(value)
        except ValueError:
            continue
    return runs
