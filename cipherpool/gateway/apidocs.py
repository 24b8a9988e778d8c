"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with no request leaving the gateway.

FastAPI's own pages load their scripts and stylesheet from a public CDN (and ReDoc's fonts
from Google), so they are blank where the gateway's users have no internet access. Here the
same pages (FastAPI's :func:`~fastapi.openapi.docs.get_swagger_ui_html` and
:func:`~fastapi.openapi.docs.get_redoc_html`) point at copies the gateway serves itself under
:data:`ASSETS`, from the ``fastapi-offline`` package (Swagger UI 5, ReDoc 2: pinned in
pyproject.toml, so an upgrade is a reviewed change): ``swagger-ui-bundle.js``,
``swagger-ui.css``, ``redoc.standalone.js`` and ``favicon.png``. Swagger UI's online
validator is turned off (it would send the spec to a public service).

The pages and the assets need no credentials (:data:`~cipherpool.gateway.guard.PUBLIC_PATHS`,
and everything under :data:`ASSETS`). Behind a proxy that serves the gateway under a path
prefix (ASGI ``root_path``), every URL in the pages carries it.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS = "/docs"
REDOC = "/redoc"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
ASSETS = "/docs/assets"  # + "/" + file name
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
SWAGGER_PARAMETERS = {"validatorUrl": None}


def assets_directory() -> str:
    """Where the package keeps the assets (a directory of the installed package)."""
    return str(files("fastapi_offline") / "static")


# The pages may load from the gateway alone: ReDoc's menu shows its maker's logo from a CDN,
# unconditionally; this makes the browser not ask for it (nor for anything else elsewhere).
# Inline script and style: FastAPI's pages start Swagger UI inline, ReDoc styles itself inline
# and runs its search in a worker made from a blob.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)


def _own_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = PAGE_POLICY
    return page


def install(app: FastAPI) -> None:
    """Serve the pages and their assets (create the app with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=assets_directory()), name="docs-assets")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return _own_only(
            get_swagger_ui_html(
                openapi_url=base + str(app.openapi_url),
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=base + OAUTH2_REDIRECT,
                swagger_js_url=f"{base}{ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{base}{ASSETS}/swagger-ui.css",
                swagger_favicon_url=f"{base}{ASSETS}/favicon.png",
                swagger_ui_parameters={**SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})},
            )
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return _own_only(
            get_redoc_html(
                openapi_url=base + str(app.openapi_url),
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{base}{ASSETS}/redoc.standalone.js",
                redoc_favicon_url=f"{base}{ASSETS}/favicon.png",
                with_google_fonts=False,
            )
        )
