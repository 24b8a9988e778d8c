"""Flower's Models page (issue 26), seen in Chromium: per model, workers up, queries in the
window and all time, average and current query time, queue wait and refusals, against what
real clients measured.

A stack of its own runs `cipherpool flower` (as `up` does) and one pool node that holds queries
while a flag file exists (:mod:`tests.integration.hold_hook`), so a query is caught running.
The browser is Debian's ``chromium`` driven through its ``chromedriver`` by Selenium
(``apt-get install chromium chromium-driver``; the test is skipped, saying so, without them).
With ``UPDATE_SCREENSHOTS=1`` in the environment the page's screenshot is written to
docs/images/flower-models.png; otherwise to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from cipherpool import errors
from cipherpool.config.settings import Settings
from cipherpool.dispatch import query_shadow
from cipherpool.messages import EncryptedInput
from cipherpool.waiting import wait_until
from tests.integration.helpers import serve
from tests.integration.hold_hook import HOLD_FILE

pytestmark = pytest.mark.integration
HOLD_HOOK = "tests.integration.hold_hook:HoldQueries"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "flower-models.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,600",
]
# A client's time holds the platform's (the gateway's publish to the node's answer) plus its
# own HTTP calls and result polling: never less, and this much more at most on a busy machine.
CLIENT_OVERHEAD_S = 0.3


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile, driven through Debian's chromedriver."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium or chromedriver on PATH: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def flowered(browser, tmp_path_factory):
    """A stack with Flower and one pool node (one query at a time) that holds queries on a flag."""
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    root = tmp_path_factory.mktemp("flower-models")
    settings = Settings(data_dir=root / "platform", node_hooks=[HOLD_HOOK], query_timeout_s=60)
    with EmbeddedStack(settings, StackOptions(nodes=1, node_concurrency=1, beat=False, flower=True)) as stack:
        yield stack


def _seconds(text: str) -> float:
    """A duration as Flower's format_duration writes it: '41.20 ms', '1.62 s', '2m 05s'."""
    text = text.strip()
    if m := re.fullmatch(r"([\d.]+) ms", text):
        return float(m[1]) / 1000
    if m := re.fullmatch(r"([\d.]+) s", text):
        return float(m[1])
    m = re.fullmatch(r"(?:(\d+)h )?(\d+)m (\d+)s", text)
    assert m, f"not a duration: {text!r}"
    return int(m[1] or 0) * 3600 + int(m[2]) * 60 + int(m[3])


def _row(driver, model_id: str) -> dict[str, tuple[str, str]]:
    """The model's row as shown: each figure's (text, data-value)."""
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"] [data-field]')
    return {c.get_attribute("data-field"): (c.text.strip(), c.get_attribute("data-value") or "") for c in cells}


def _count(row: dict[str, tuple[str, str]], field: str) -> int:
    text, value = row[field]
    assert text.replace(",", "") == value, (field, text, value)  # what is shown is the figure
    return int(value)


def _duration(row: dict[str, tuple[str, str]], field: str) -> float:
    text, value = row[field]
    shown, exact = _seconds(text.splitlines()[0]), float(value)
    assert shown == pytest.approx(exact, rel=0.01, abs=0.001), (field, text, value)
    return exact


def _api_row(api: httpx.Client, model_id: str) -> dict:
    found = api.get("/api/models")
    found.raise_for_status()
    return next(m for m in found.json()["models"] if m["model_id"] == model_id)


def _open(driver, url: str, model_id: str) -> dict[str, tuple[str, str]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 15).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"]'))
    )
    return _row(driver, model_id)


def test_models_page_shows_what_the_clients_measured(flowered, browser, examples, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    stack, driver, example = flowered, browser, examples["cancer"]
    user, password = stack.flower_auth.split(":", 1)
    page = stack.flower_url + "/models?refresh=0"
    # Flower's own login guards the page and its JSON.
    assert httpx.get(page, timeout=10).status_code == 401
    assert httpx.get(stack.flower_url + "/api/models", timeout=10).status_code == 401
    api = httpx.Client(base_url=stack.flower_url, auth=(user, password), timeout=10)

    mc, qc, worker_id = serve(stack, example, "wine", tmp_path / "keys")
    model_id = qc.model.id
    # Flower hears the node's heartbeats: its event consumer is live and will see every query.
    wait_until(lambda: _api_row(api, model_id)["workers"][0]["node_online"], 60, interval_s=0.3)

    # Three queries one at a time, as each client measures them; and one refused at the gateway.
    measured: list[float] = []
    for x in example.x_test[:3]:
        ciphertext = qc.encrypt(x)
        started = time.perf_counter()
        qc.submit(ciphertext).result(60)
        measured.append(time.perf_counter() - started)
    envelope = EncryptedInput.decode(qc.encrypt(example.x_test[0]))
    with pytest.raises(errors.InvalidInput):
        qc.execute(EncryptedInput(envelope.model_id, envelope.key_id, b"\0" * 64).encode())

    # Three more while the node holds the first of them: one running, two waiting in the queue.
    flag = stack.data_dir / HOLD_FILE
    flag.touch()
    try:
        ciphertexts = [qc.encrypt(x) for x in example.x_test[3:6]]
        held = []
        for ciphertext in ciphertexts:
            started, sent_after = time.perf_counter(), time.time()
            handle = qc.submit(ciphertext)
            held.append((handle, started, sent_after, time.time()))
        wait_until(lambda: _api_row(api, model_id)["live"]["running"] == 1, 30, interval_s=0.1)
        time.sleep(1.0)
        # The first visit logs in with Flower's basic auth; the browser keeps it for the origin.
        before = time.time()
        row = _open(driver, page.replace("://", f"://{quote(user)}:{quote(password)}@", 1), model_id)
        after = time.time()
        assert driver.title == "Models · Flower"
        running_s = _duration(row, "current_query")
        _, _, first_sent_after, first_sent_by = held[0]
        assert _count(row, "running") == 1
        assert before - first_sent_by - 0.05 <= running_s <= after - first_sent_after + 0.05
        source = driver.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"] [data-field="current_query"]')
        assert source.get_attribute("data-source") == "running"
        assert 1 <= _count(row, "queue_depth") <= 2  # the running one is the node's; the others wait
    finally:
        released = time.time()
        flag.unlink(missing_ok=True)
    for handle, started, _, _ in held:
        handle.result(60)
        measured.append(time.perf_counter() - started)
    wait_until(lambda: _api_row(api, model_id)["queries_all_time"] == 6, 15, interval_s=0.2)

    # Then the page shows every figure as the clients saw it.
    row = _open(driver, page, model_id)
    assert _count(row, "workers_up") == 1
    worker = driver.find_element(By.CSS_SELECTOR, f'[data-worker="{worker_id}"]')
    assert "up on node1" in worker.text and worker.find_elements(By.CSS_SELECTOR, ".status-dot-live")
    assert _count(row, "queries_window") == _count(row, "queries_all_time") == len(measured) == 6
    assert _count(row, "refused_window") == _count(row, "refused_all_time") == 1
    assert _count(row, "failed_window") == _count(row, "failed_all_time") == 0
    mean = statistics.fmean(measured)
    for field in ("average_query", "average_query_all_time"):
        shown = _duration(row, field)
        assert shown <= mean + 0.01 and mean - shown <= CLIENT_OVERHEAD_S + 0.1 * mean, (field, shown, measured)
    latest = _duration(row, "current_query")
    assert latest <= measured[-1] + 0.01 and measured[-1] - latest <= CLIENT_OVERHEAD_S + 0.1 * measured[-1]
    current = driver.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"] [data-field="current_query"]')
    assert current.get_attribute("data-source") == "latest"
    # Each held query waited at least from its publish to the release: the average wait says so.
    waited = sum(released - sent_by for _, _, _, sent_by in held) / len(measured)
    assert waited - 0.05 <= _duration(row, "queue_wait") <= _duration(row, "average_query")
    assert _count(row, "queue_depth") == 0
    # The JSON has the same figures.
    same = _api_row(api, model_id)
    assert (same["queries_all_time"], same["refused_all_time"], same["workers_up"]) == (6, 1, 1)
    assert same["average_query_s"] == pytest.approx(float(row["average_query"][1]))
    # The page is in Flower's navbar, and its link opens Flower's Tasks page on this model's
    # queries only (the refused one never reached the broker), none of the control tasks.
    nav = driver.find_element(By.CSS_SELECTOR, "nav .nav-link.active")
    assert nav.text == "Models"
    screenshot = DOCS_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / "flower-models.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot))
    assert _count(row, "tasks_link") == 6
    driver.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"] a[data-tasks-link]').click()

    def listed() -> list[str] | None:
        names = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr td:first-child")]
        return names if len(names) == 6 else None

    names = WebDriverWait(driver, 15).until(lambda _: listed())
    assert set(names) == {query_shadow("wine", model_id)}
    info = driver.find_element(By.CSS_SELECTOR, "#tasks-table_info").text
    total = int(re.search(r"filtered from ([\d,]+) total", info)[1].replace(",", ""))
    assert total > 6, info  # Flower holds other tasks (the control worker's), left out by the filter
    api.close()
    mc.close()
    qc.close()


def test_the_api_pages_render_offline_in_the_browser(flowered, browser):
    """/docs (Swagger UI) and /redoc render from the gateway's own assets: this Chromium reaches
    nothing but loopback (no background networking, no route out), so a page that needed a CDN
    would stay blank. Every script and stylesheet the pages loaded came from the gateway."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    driver, gateway = browser, flowered.gateway_url
    driver.get(f"{gateway}/docs")
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/queries" in {p.replace("\u200b", "") for p in paths}, sorted(paths)[:10]
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(gateway) for url in loaded), loaded

    driver.get(f"{gateway}/redoc")
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "redoc .api-content h2"))
    headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "redoc h1, redoc h2")]
    assert "cipherpool" in " ".join(headings).lower() and len(headings) > 10, headings[:20]
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus, e.transferSize])"
    )
    assert [u for u, _, _ in loaded if u.startswith(gateway)], loaded
    # ReDoc's menu asks for its maker's logo from a CDN whatever the options: the page's policy
    # (Content-Security-Policy, cipherpool/gateway/apidocs.py) keeps the browser from fetching it.
    elsewhere = [(u, status, size) for u, status, size in loaded if not u.startswith(gateway)]
    assert all(status == 0 and size == 0 for _, status, size in elsewhere), elsewhere
