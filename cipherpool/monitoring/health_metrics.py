"""The platform's own health as Prometheus families, beside the query figures on ``/metrics``.

The same :class:`~cipherpool.api.schemas.PlatformStatus` that `cipherpool status` prints, so
an alert fires on exactly what the operator then reads. Families (docs/operations.md, "Monitoring"):

* ``cipherpool_component_up{component}``: 0 when missing, else 1 (late is up, but late);
* ``cipherpool_component_state{component, state}``: 1 for its state, 0 for the others;
* ``cipherpool_beat_job_age_seconds{job}``: since the job last ran (never ran: since beat
  started; nothing known: +Inf, so ``> threshold`` holds), and
  ``cipherpool_beat_job_interval_seconds{job}``, its schedule, to compare with;
* ``cipherpool_process_heartbeat_age_seconds{role, instance}``: each gateway, control worker
  and beat;
* ``cipherpool_redis_memory_used_bytes``, ``cipherpool_redis_memory_max_bytes`` (0: no bound),
  ``cipherpool_redis_memory_ratio`` (only with a bound);
* ``cipherpool_platform_events_total``: platform events recorded (any change of state).
"""

from __future__ import annotations

import math

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cipherpool.api.schemas import PlatformStatus
from cipherpool.statuses import ComponentState


def health_families(status: PlatformStatus, events_total: int | None) -> list[Metric]:
    up = GaugeMetricFamily(
        "cipherpool_component_up",
        "1 unless the platform component is missing (see cipherpool_component_state).",
        labels=("component",),
    )
    state = GaugeMetricFamily(
        "cipherpool_component_state", "The component's state: 1 for the one it is in.", labels=("component", "state")
    )
    for c in status.components:
        up.add_metric([c.component.value], 0 if c.state is ComponentState.MISSING else 1)
        for s in ComponentState:
            state.add_metric([c.component.value, s.value], int(c.state is s))
    age = GaugeMetricFamily(
        "cipherpool_beat_job_age_seconds",
        "Seconds since the beat job last ran (never: since beat started; +Inf: unknown).",
        labels=("job",),
    )
    interval = GaugeMetricFamily("cipherpool_beat_job_interval_seconds", "How often beat schedules the job.", labels=("job",))
    for job in status.beat_jobs:
        age.add_metric([job.job], math.inf if job.age_s is None else job.age_s)
        interval.add_metric([job.job], job.interval_s)
    heartbeat = GaugeMetricFamily(
        "cipherpool_process_heartbeat_age_seconds",
        "Seconds since the platform process last heartbeat.",
        labels=("role", "instance"),
    )
    for process in [*status.gateways, *status.control_workers, *status.beats]:
        heartbeat.add_metric([process.role, process.instance], process.age_s)
    families: list[Metric] = [up, state, age, interval, heartbeat]
    store = status.store
    if store.reachable and store.used_memory_bytes is not None:
        families.append(
            GaugeMetricFamily(
                "cipherpool_redis_memory_used_bytes", "Redis used_memory (INFO memory).", value=store.used_memory_bytes
            )
        )
        families.append(
            GaugeMetricFamily(
                "cipherpool_redis_memory_max_bytes", "Redis maxmemory (0: no bound).", value=store.maxmemory_bytes or 0
            )
        )
        if store.memory_ratio is not None:
            families.append(
                GaugeMetricFamily("cipherpool_redis_memory_ratio", "Redis used_memory / maxmemory.", value=store.memory_ratio)
            )
    if events_total is not None:
        families.append(
            CounterMetricFamily(
                "cipherpool_platform_events", "Platform events recorded (a component changed state).", value=events_total
            )
        )
    return families
