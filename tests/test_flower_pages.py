"""Flower's Models page without a stack: the figures (:mod:`cipherpool.monitoring.flower_figures`)
from canned platform figures and task events, and the page itself served by a real Flower
application (:mod:`cipherpool.monitoring.flower_pages`), behind its basic auth. The page in a
browser, on a real stack: tests/integration/test_flower_models.py."""

from __future__ import annotations

import base64
import json
import re
import time
from types import SimpleNamespace

import pytest
from tornado.testing import AsyncHTTPTestCase

from cipherpool.api.schemas import CurrentFigures, ModelStats, TimingFigures, WorkerTimings
from cipherpool.dispatch import query_shadow
from cipherpool.monitoring.flower_figures import live_queries, model_row, tasks_url
from cipherpool.monitoring.flower_pages import FLOWER_TEMPLATES, NAV_OPENS, navbar_source

MODEL_ID = "3f2a9c1b77aa4e01"
SHADOW = query_shadow("wine", MODEL_ID)


def _timing(queries: int, refused: int = 0, failed: int = 0, average: float | None = None) -> TimingFigures:
    return TimingFigures(
        queries=queries,
        refused=refused,
        failed=failed,
        average_query_s=average,
        average_compute_s=average,
        average_queue_wait_s=0.25 if average else None,
        queries_per_minute=queries / 5 if queries else None,
        error_rate=None,
        refusal_rate=refused / (queries + refused + failed) if queries + refused + failed else None,
    )


def _stats(latest: float | None = 1.5) -> ModelStats:
    current = CurrentFigures(
        queries=2 if latest else 0,
        average_query_s=1.25 if latest else None,
        average_compute_s=1.0 if latest else None,
        average_queue_wait_s=0.25 if latest else None,
        latest_query_s=latest,
        latest_at=time.time() - 10 if latest else None,
    )
    worker = WorkerTimings(
        worker_id="w1", node="node1@host", status="up", window=_timing(3), all_time=_timing(9), current=current
    )
    return ModelStats(
        model="wine",
        model_id=MODEL_ID,
        status="active",
        at=time.time(),
        window_s=300,
        span_s=330.0,
        queue_depth=2,
        workers_by_status={"up": 1, "loading": 1},
        window=_timing(3, refused=1, average=1.2),
        all_time=_timing(9, refused=4, failed=1, average=1.1),
        current=current,
        workers=[worker],
    )


def _task(state: str, sent: float | None = None, started: float | None = None, runtime: float | None = None):
    return SimpleNamespace(state=state, sent=sent, received=None, started=started, runtime=runtime)


def test_live_queries_count_each_state_and_time_the_running_ones_from_when_they_were_sent():
    now = 1000.0
    tasks = [
        _task("SUCCESS", sent=900, runtime=0.5),
        _task("SUCCESS", sent=910, runtime=1.5),
        _task("FAILURE", sent=920),
        _task("REVOKED", sent=921),
        _task("STARTED", sent=990, started=995),  # 10 s so far, queue wait included
        _task("STARTED", started=997),  # no task-sent heard: from its start
        _task("STARTED", sent=500, started=501),  # past the deadline: its node went away, nobody waits
        _task("RECEIVED", sent=998),  # prefetched, still waiting on the node
        _task("PENDING", sent=999),
    ]
    live = live_queries(SHADOW, tasks, now, deadline_s=120)
    assert (live.seen, live.succeeded, live.failed, live.running) == (9, 2, 2, 2)
    assert live.running_elapsed_s == 10.0 and live.average_runtime_s == 1.0
    assert live_queries(SHADOW, [], now, 120).running_elapsed_s is None


def test_a_model_row_takes_the_platforms_figures_and_the_running_queries_from_flower():
    running = live_queries(SHADOW, [_task("STARTED", sent=95.0)], 100.0, 120)
    row = model_row("acme", _stats(), running, {"node1@host": True}, "/flower")
    assert (row.workers_up, row.queries_window, row.queries_all_time) == (1, 3, 9)
    assert (row.average_query_s, row.average_query_all_time_s, row.queue_wait_s, row.queue_depth) == (1.2, 1.1, 0.25, 2)
    assert (row.refused_window, row.refused_all_time, row.failed_all_time) == (1, 4, 1)
    assert (row.current_query_s, row.current_source) == (5.0, "running")
    assert row.workers[0].node_online is True
    assert row.tasks_url == "/flower/tasks?name=cipherpool.query%5Bwine%3A3f2a9c1b%5D"

    # The gateway's refusals by code, where the platform's figures have them.
    coded = _stats().model_copy(update={"refusals": {"quota_exceeded": 2}, "refusals_all_time": {"quota_exceeded": 5}})
    row = model_row("acme", coded, running, {})
    assert (row.refusals_by_code, row.refusals_by_code_all_time) == ({"quota_exceeded": 2}, {"quota_exceeded": 5})

    idle = live_queries(SHADOW, [_task("SUCCESS", sent=1, runtime=1)], 100.0, 120)
    row = model_row("acme", _stats(latest=1.5), idle, {})
    assert (row.current_query_s, row.current_source, row.recent_average_query_s) == (1.5, "latest", 1.25)
    assert row.workers[0].node_online is None  # Flower never heard of the node
    row = model_row("acme", _stats(latest=None), idle, {"node1@host": False})
    assert (row.current_query_s, row.current_source, row.workers[0].node_online) == (None, None, False)


def test_tasks_url_searches_flowers_tasks_page_by_name():
    assert tasks_url("", "cipherpool.query[") == "/tasks?name=cipherpool.query%5B"


def test_flowers_navbar_gains_the_models_and_queries_links():
    flower_navbar = (FLOWER_TEMPLATES / "navbar.html").read_text()
    assert NAV_OPENS in flower_navbar, "Flower's navbar changed: see flower_pages.navbar_source"
    patched = navbar_source(flower_navbar)
    links = patched[patched.index(NAV_OPENS) : patched.index("</ul>", patched.index(NAV_OPENS))]
    assert "reverse_url('broker')" in links and "reverse_url('cipherpool-models')" in links and ">Queries</a>" in links
    assert navbar_source("<nav>elsewhere</nav>") == "<nav>elsewhere</nav>"


class FlowerWithPages(AsyncHTTPTestCase):
    """A real Flower application with the pages added (nothing started: no broker), its
    platform figures canned, its event state fed by hand."""

    LOGIN = "admin:s3cret"

    def get_app(self):
        from celery import Celery
        from flower.app import Flower
        from flower.options import options
        from flower.urls import settings

        from cipherpool.config.settings import Settings
        from cipherpool.context import PlatformContext
        from cipherpool.monitoring import flower_pages

        self._saved = options.basic_auth
        options.basic_auth = [self.LOGIN]
        self.addCleanup(setattr, options, "basic_auth", self._saved)
        app = Flower(capp=Celery(set_as_current=False), options=options, io_loop=self.io_loop, **settings)
        self.addCleanup(app.executor.shutdown, wait=False)
        pages = flower_pages.add_pages(app, PlatformContext(Settings(query_timeout_s=60)))
        pages.platform_figures = lambda *_, **__: [("acme", _stats())]
        self.flower, self.pages = app, pages
        return app

    def _get(self, path: str, login: str | None = LOGIN):
        headers = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()} if login else {}
        return self.fetch(path, headers=headers)

    def _hear(self, **event):
        now = time.time()
        self.flower.events.state.event({"timestamp": now, "local_received": now, "clock": 1, **event})

    def test_the_page_and_its_json_are_behind_flowers_login(self):
        for path in ("/models", "/api/models"):
            assert self._get(path, login=None).code == 401
            assert self._get(path, login="admin:wrong").code == 401

    def test_the_page_shows_the_figures_in_flowers_navbar(self):
        self._hear(type="worker-heartbeat", hostname="node1@host", freq=2.0)
        self._hear(type="task-sent", uuid="q1", name=SHADOW, hostname="gateway@host", timestamp=time.time() - 3)
        self._hear(type="task-started", uuid="q1", hostname="node1@host")
        found = json.loads(self._get("/api/models").body)
        (row,) = found["models"]
        assert (row["model"], row["workers_up"], row["queries_window"], row["refused_all_time"]) == ("wine", 1, 3, 4)
        assert row["current_source"] == "running" and row["current_query_s"] == pytest.approx(3, abs=0.5)
        assert row["live"]["running"] == 1 and row["workers"][0]["node_online"] is True
        assert found["queries_url"] == "/tasks?name=cipherpool.query%5B"

        page = self._get("/models?refresh=0")
        html = page.body.decode()
        assert page.code == 200 and "Refresh" not in page.headers
        assert re.search(r'class="nav-link active"\s+href="/models"', html)
        assert 'href="/tasks?name=cipherpool.query%5B"' in html
        assert 'data-field="queries_all_time" data-value="9"' in html and 'data-field="queue_depth" data-value="2"' in html
        assert 'data-source="running"' in html and SHADOW in html
        assert self._get("/models").headers["Refresh"] == "10"
        # Flower's own pages carry the link too.
        assert 'href="/models"' in self._get("/tasks").body.decode()

    def test_the_page_shows_the_key_cache_figures(self):
        # Given figures with key-cache lookups and a worker's resident key bytes (issue 27)
        stats = _stats()
        window = stats.window.model_copy(
            update={"key_cache_hits": 9, "key_cache_misses": 1, "key_cache_hit_ratio": 0.9, "average_key_load_s": 1.25}
        )
        worker = stats.workers[0].model_copy(update={"key_bytes": 3 * 1048576})
        self.pages.platform_figures = lambda *_, **__: [
            ("acme", stats.model_copy(update={"window": window, "workers": [worker]}))
        ]
        # Then the page and its JSON show them
        (row,) = json.loads(self._get("/api/models").body)["models"]
        assert (row["key_cache_hit_ratio"], row["key_load_s"], row["key_bytes"]) == (0.9, 1.25, 3 * 1048576)
        html = self._get("/models?refresh=0").body.decode()
        assert 'data-field="key_cache_hit_ratio" data-value="0.9">90.0 %' in html
        assert 'data-field="key_bytes" data-value="3145728">3.0 MiB' in html and 'data-field="key_load"' in html

    def test_a_bad_window_is_a_400(self):
        assert self._get("/api/models?window=5").code == 400

    def test_a_platform_out_of_reach_is_a_503_with_the_reason(self):
        def unreachable(*_, **__):
            raise ConnectionError("database down")

        self.pages.platform_figures = unreachable
        for path in ("/models", "/api/models"):
            answer = self._get(path)
            assert answer.code == 503 and b"could not be read" in answer.body

    def test_names_are_escaped_on_the_page(self):
        """Account and worker names come from tenants and operators: never markup on the page."""
        self.pages.platform_figures = lambda *_, **__: [("<script>alert(1)</script>", _stats())]
        html = self._get("/models?refresh=0").body.decode()
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_flower_refuses_to_serve_without_a_login(tmp_path):
    """Flower itself would serve with no login; the Models page names every tenant's models."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CIPHERPOOL_"))}
    env["CIPHERPOOL_DATA_DIR"] = str(tmp_path)
    env["CIPHERPOOL_BROKER_URL"] = "redis://127.0.0.1:9/0"  # never reached: it stops before
    result = subprocess.run(
        [sys.executable, "-m", "cipherpool", "flower", "--port=0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "without a login" in result.stderr and "FLOWER_BASIC_AUTH" in result.stderr
