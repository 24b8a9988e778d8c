"""``/docs`` and ``/redoc`` work offline (issue 26): every script, stylesheet and icon their
pages load is served by the gateway itself (from the ``fastapi-offline`` package), with no
credential, and nothing in the pages points outside the gateway.

The app is built on settings whose Redis does not exist: the pages and their assets must not
need it (they pass the guard as public paths). A browser's view of the pages is checked apart,
in Chromium, by whoever runs the UI checks.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from cipherpool.gateway.apidocs import ASSET_FILES, ASSETS

PAGES = ("/docs", "/redoc")
ASSET_URL = re.compile(r'(?:src|href)\s*=\s*"([^"]*)"')


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Any:
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.gateway.app import create_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("apidocs"), broker_url="redis://127.0.0.1:9/0")
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.mark.parametrize("page", PAGES)
def test_a_page_loads_only_what_the_gateway_serves(client, page):
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.IGNORECASE), "an address outside the gateway"
    urls = ASSET_URL.findall(html)
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and all(u.startswith(ASSETS + "/") for u in urls), urls
    for url in urls:
        asset = client.get(url)  # no credential: a browser sends none
        assert asset.status_code == 200, (url, asset.text[:200])
        assert len(asset.content) > 1000
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"]
            assert asset.text.lstrip().startswith(("/*", "!function", "(")), asset.text[:80]


def test_swagger_ui_reads_the_gateways_openapi_and_asks_no_public_validator(client):
    html = client.get("/docs").text
    assert "url: '/openapi.json'" in html and '"validatorUrl": null' in html
    assert f'src="{ASSETS}/swagger-ui-bundle.js"' in html and f'href="{ASSETS}/swagger-ui.css"' in html
    bundle = client.get(f"{ASSETS}/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle=" in bundle[:1000]  # what the page calls
    assert client.get("/openapi.json").json()["info"]["title"] == "cipherpool"
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_redoc_reads_the_gateways_openapi_without_web_fonts(client):
    html = client.get("/redoc").text
    assert 'spec-url="/openapi.json"' in html and f'src="{ASSETS}/redoc.standalone.js"' in html
    assert "fonts.googleapis" not in html
    assert "Redoc" in client.get(f"{ASSETS}/redoc.standalone.js").text[:2000]


def test_every_asset_is_served_and_nothing_else_is(client):
    for name in ASSET_FILES:
        assert client.head(f"{ASSETS}/{name}").status_code == 200, name
    missing = client.get(f"{ASSETS}/nothing.js")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert client.post(f"{ASSETS}/swagger-ui.css").status_code == 405
    assert client.get("/docs/other").status_code == 401, "only the assets' folder is public, not /docs/*"


def test_behind_a_path_prefix_every_url_carries_it(tmp_path):
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.gateway.app import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:9/0"))
    prefixed = TestClient(app, root_path="/api", raise_server_exceptions=False)
    for page in PAGES:
        html = prefixed.get(page).text
        urls = ASSET_URL.findall(html)
        assert urls and all(u.startswith("/api" + ASSETS + "/") for u in urls), urls
        assert "/api/openapi.json" in html


def test_behind_a_proxy_prefix_uvicorn_passes_in_the_path_the_pages_stay_public(tmp_path):
    """uvicorn --root-path /api puts the prefix in the ASGI path as well: the guard must match
    what the routes match (the path after the prefix), or the public pages answer 401."""
    from fastapi.testclient import TestClient

    from cipherpool.config.settings import Settings
    from cipherpool.gateway.app import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:9/0"))
    prefixed = TestClient(app, root_path="/api", raise_server_exceptions=False)
    for path in ["/api/docs", "/api/redoc", f"/api{ASSETS}/{next(iter(ASSET_FILES))}", "/api/openapi.json"]:
        answer = prefixed.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
    assert prefixed.get("/api/v1/models").status_code == 401  # the rest still needs a credential


def test_the_pages_forbid_the_browser_anything_but_the_gateway(client):
    """ReDoc's menu asks for a logo from a CDN whatever its options; the policy keeps the
    browser from asking (tests/integration/test_flower_models.py checks it in Chromium)."""
    for page in PAGES:
        policy = client.get(page).headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'self'" and directives["img-src"] == "'self' data:", policy
        assert all("http" not in value for value in directives.values()), policy
