"""The platform's own health on a real stack (issue 21): beat's jobs are fresh while beat
runs; once beat is killed (by its own pid) beat goes missing in `cipherpool status`, in
``GET /v1/platform/status``, in ``/metrics``, and the gateway's watchdog records one platform
event for it. Short intervals, set in the stack's settings, keep it well under a minute."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cipherpool.api.schemas import PlatformStatus
from cipherpool.config.settings import Settings, reset_settings
from cipherpool.monitoring.liveness import MISSING_AFTER_INTERVALS
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.statuses import Component, ComponentState
from cipherpool.waiting import wait_until

pytestmark = pytest.mark.integration
TOKEN = "integration-metrics-token-0c7d2e9a"
HEARTBEAT_S = 1.0  # gateways, the control worker and beat; and the watchdog
JOB_S = 2.0  # each of beat's jobs
JOBS = {
    "reconcile_interval_s": JOB_S,
    "billing_interval_s": JOB_S,
    "schedule_interval_s": JOB_S,
    "alert_interval_s": JOB_S,
    "autoscale_interval_s": JOB_S,
    "key_sweep_interval_s": JOB_S,
}


def beat_state(status: PlatformStatus) -> ComponentState:
    return {c.component: c.state for c in status.components}[Component.BEAT]


def test_a_killed_beat_goes_missing_everywhere_and_is_recorded_once(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "platform",
        metrics_token=TOKEN,
        platform_heartbeat_s=HEARTBEAT_S,
        platform_watchdog_s=HEARTBEAT_S,
        node_preload=False,
        **JOBS,
    )
    with (
        EmbeddedStack(settings, StackOptions(nodes=1, beat=True, flower=False)) as stack,
        httpx.Client(base_url=stack.gateway_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http,
    ):

        def status() -> PlatformStatus:
            response = http.get("/v1/platform/status", params={"events": 50})
            assert response.status_code == 200, response.text
            return PlatformStatus.model_validate(response.json())

        def cli_status(exit_code: int = 0) -> PlatformStatus:
            """`cipherpool status --json` as the operator on this machine runs it: the stack's data
            directory, the same intervals (it judges beat's jobs by its own settings)."""
            from cipherpool.cli import cli

            env = {f"CIPHERPOOL_{name.upper()}": str(value) for name, value in JOBS.items()}
            reset_settings()
            try:
                result = CliRunner(env=env).invoke(cli, ["--data-dir", str(stack.data_dir), "--json", "status"])
            finally:
                reset_settings()
            assert result.exit_code == exit_code, result.output  # 7 when a component is missing
            return PlatformStatus.model_validate(json.loads(result.stdout))

        # While beat runs, each of its jobs has run within its interval, and everything else is up
        def when(predicate):
            def check() -> PlatformStatus | None:
                seen = status()
                return seen if predicate(seen) else None

            return check

        fresh = wait_until(
            when(lambda s: beat_state(s) is ComponentState.OK and all(j.last_run for j in s.beat_jobs)), 30, interval_s=0.5
        )
        assert {j.job for j in fresh.beat_jobs} == {"reconcile", "billing", "schedules", "alerts", "autoscale", "keys"}
        # ... run by this beat: each after it started (not chosen by the wait above, which
        # asked only that each ran once and that the judge found them on time)
        (this_beat,) = fresh.beats
        assert all(j.last_run is not None and j.last_run >= this_beat.started_at for j in fresh.beat_jobs), (
            this_beat.started_at,
            fresh.beat_jobs,
        )
        states = {c.component: c.state for c in fresh.components}
        assert states[Component.GATEWAY] is states[Component.CONTROL] is states[Component.STORE] is ComponentState.OK
        assert [b.pid for b in fresh.beats] == [next(c.pid for c in stack.supervisor.children if c.name == "beat")]
        assert fresh.control_workers[0].instance.startswith("control@")
        assert beat_state(cli_status()) is ComponentState.OK

        # When beat is killed (the supervisor knows it by name; nothing restarts it here)
        beat = next(c for c in stack.supervisor.children if c.name == "beat")
        os.kill(beat.pid, signal.SIGKILL)
        beat.process.wait(timeout=10)
        killed = time.monotonic()

        # Then within a few intervals beat is missing, its jobs stale, and the control worker still ok
        gone = wait_until(when(lambda s: beat_state(s) is ComponentState.MISSING), 30, interval_s=0.5)
        noticed_s = time.monotonic() - killed
        assert noticed_s < MISSING_AFTER_INTERVALS * JOB_S + 5, noticed_s
        assert {c.component: c.state for c in gone.components}[Component.CONTROL] is ComponentState.OK
        assert gone.state is ComponentState.MISSING

        # ... as the watchdog's event says, recorded once
        def beat_missing_events() -> list[object]:
            return [e for e in status().events if e.component is Component.BEAT and e.state is ComponentState.MISSING]

        (event,) = wait_until(beat_missing_events, 10, interval_s=0.5)
        assert "beat" in event.detail

        # ... and /metrics: beat down, every job older than its interval
        scraped = http.get("/metrics")
        assert scraped.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(scraped.text)
            for s in f.samples
        }
        assert samples[("cipherpool_component_up", (("component", "beat"),))] == 0
        assert samples[("cipherpool_component_up", (("component", "control"),))] == 1
        ages = {labels[0][1]: v for (name, labels), v in samples.items() if name == "cipherpool_beat_job_age_seconds"}
        assert len(ages) == len(JOBS) and all(age > JOB_S for age in ages.values()), ages

        # ... and the operator's CLI
        shown = cli_status(exit_code=7)
        assert beat_state(shown) is ComponentState.MISSING
        assert [e.id for e in shown.events if e.component is Component.BEAT and e.state is ComponentState.MISSING] == [event.id]
        print(f"\nbeat killed: missing after {noticed_s:.1f} s (jobs every {JOB_S:g} s, heartbeat {HEARTBEAT_S:g} s)")
