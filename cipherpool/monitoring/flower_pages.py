"""Flower with cipherpool's Models page: ``cipherpool flower`` (what ``cipherpool up`` runs).

Flower 2.2 builds its Tornado application from a fixed list of handlers; its command takes no
plug-ins. ``cipherpool flower`` is Flower's own command (the same options, ``FLOWER_*``
environment and ``--conf`` file, parsed by Flower's own functions) with two additions made
through Tornado's public API before it serves:

* two handlers (:meth:`tornado.web.Application.add_handlers`, which take precedence over
  Flower's catch-all 404): ``/models``, a page that extends Flower's ``base.html`` (its
  navbar, styles, theme), and ``/api/models``, the same figures as JSON. Both are Flower
  handlers (:class:`flower.views.BaseHandler`), so Flower's own login guards them: basic
  auth or OAuth, whichever Flower runs with;
* a template loader (Tornado's ``template_loader`` setting) that serves Flower's templates
  as they are, except its navbar, which gains *Models* and *Queries* (Flower's Tasks page
  searched for ``name:cipherpool.query[``: every model's queries, none of beat's
  housekeeping). Should a later Flower's navbar not have the list these links go into, it is
  served unchanged: the pages are still at their URLs.

The figures: :mod:`.flower_figures`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flower  # type: ignore[import-untyped]
import tornado.template
import tornado.web
from celery import Celery
from flower.api import BaseApiHandler  # type: ignore[import-untyped]
from flower.app import Flower, rewrite_handler  # type: ignore[import-untyped]
from flower.utils.tasks import search_tasks  # type: ignore[import-untyped]
from flower.views import BaseHandler  # type: ignore[import-untyped]
from sqlmodel import select
from tornado.ioloop import IOLoop

from cipherpool.api.schemas import ModelStats
from cipherpool.context import PlatformContext
from cipherpool.db.tables import Account, Model
from cipherpool.dispatch import QUERY_TASK_PREFIX, query_shadow
from cipherpool.errors import InvalidInput
from cipherpool.monitoring import stats
from cipherpool.monitoring.flower_figures import ModelsPage, live_queries, model_row, tasks_url

log = logging.getLogger("cipherpool.monitoring")
FLOWER_TEMPLATES = Path(flower.__file__).parent / "templates"
OWN_TEMPLATES = Path(__file__).parent / "templates"
PAGE_TEMPLATE = "cipherpool_models.html"
PAGE_NAME = "cipherpool-models"  # the page's route name, for reverse_url
ALL_QUERIES = QUERY_TASK_PREFIX + "["  # what every query's shadow name begins with
NAV_OPENS = '<ul class="app-nav navbar-nav">'  # Flower's list of page links in its navbar
NAV_LINKS = """
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'models' %} active{% end %}"
            href="{{ reverse_url('cipherpool-models') }}"
            {% if active_tab == 'models' %}aria-current="page"{% end %}>Models</a>
        </li>
        <li class="nav-item">
          <a class="nav-link" href="{{ reverse_url('tasks') }}?name=cipherpool.query%5B"
            title="The Tasks page, searched for every model's queries">Queries</a>
        </li>
"""
DEFAULT_REFRESH_S = 10


def navbar_source(flower_navbar: str) -> str:
    """Flower's navbar with the Models and Queries links after its own page links (unchanged
    if its list of links is not where Flower 2.2 has it)."""
    start = flower_navbar.find(NAV_OPENS)
    end = flower_navbar.find("</ul>", start) if start >= 0 else -1
    if end < 0:
        log.warning("Flower's navbar has no list of page links: the Models page is not linked from it")
        return flower_navbar
    return flower_navbar[:end] + NAV_LINKS.lstrip("\n") + "      " + flower_navbar[end:]


class PagesLoader(tornado.template.Loader):
    """Flower's templates, its navbar with our links, and our page's template."""

    def __init__(self, **kwargs: Any):
        super().__init__(str(FLOWER_TEMPLATES), **kwargs)

    def _create_template(self, name: str) -> tornado.template.Template:
        if name == PAGE_TEMPLATE:
            return tornado.template.Template((OWN_TEMPLATES / name).read_bytes(), name=name, loader=self)
        if name == "navbar.html":
            source = navbar_source((FLOWER_TEMPLATES / name).read_text())
            return tornado.template.Template(source, name=name, loader=self)
        return super()._create_template(name)


class Pages:
    """What the page's handlers share: the platform (database, Redis) and when Flower began
    hearing events (its live figures cover what it heard since)."""

    def __init__(self, ctx: PlatformContext, since: float):
        self.ctx = ctx
        self.since = since

    def platform_figures(
        self, capp: Celery, *, window_s: int, last: int, now: float, model: str | None, account: str | None
    ) -> list[tuple[str, ModelStats]]:
        """Every model's :class:`ModelStats` (blocking: database, Redis, broker), by account
        and name; ``model`` and ``account`` select by name."""
        query = select(Account.name, Model).join(Model, Model.account_id == Account.id)  # type: ignore[arg-type]
        if model:
            query = query.where(Model.name == model)
        if account:
            query = query.where(Account.name == account)
        found = []
        with self.ctx.session() as session:
            for account_name, row in session.exec(query.order_by(Account.name, Model.name)).all():
                figures = stats.model_stats(session, self.ctx.store.redis, capp, row, window_s=window_s, last=last, now=now)
                found.append((account_name, figures))
        return found


class ModelsHandler(BaseHandler):  # type: ignore[misc]
    """Reads the page's figures: the platform's in a thread (blocking I/O), Flower's event
    state on the IOLoop's thread, where Flower applies its events."""

    pages: Pages

    def initialize(self, pages: Pages) -> None:
        self.pages = pages

    async def figures(self) -> ModelsPage:
        settings = self.pages.ctx.settings
        try:
            window_s = stats.check_window(int(self.get_argument("window", str(settings.stats_window_s))))
            last = max(1, int(self.get_argument("last", str(settings.stats_recent))))
        except (ValueError, InvalidInput) as exc:
            raise tornado.web.HTTPError(400, str(exc)) from None
        model, account = self.get_argument("model", None, escape=False), self.get_argument("account", None, escape=False)
        application = self.application
        read = functools.partial(
            self.pages.platform_figures,
            application.capp,
            window_s=window_s,
            last=last,
            now=time.time(),
            model=model,
            account=account,
        )
        try:
            platform = await IOLoop.current().run_in_executor(None, read)
        except Exception:  # noqa: BLE001 - Flower's other pages keep working; the log has the trace
            log.warning("Models page: could not read the platform's figures", exc_info=True)
            raise tornado.web.HTTPError(
                503, "The platform's figures could not be read (database, Redis or broker): see Flower's log."
            ) from None
        events = application.events
        now = time.time()
        nodes_online = {name: bool(worker.alive) for name, worker in events.state.workers.items()}
        task_map = getattr(events.state.tasks, "data", events.state.tasks)
        prefix = ("/" + application.options.url_prefix.strip("/")) if application.options.url_prefix else ""
        rows = []
        for account_name, figures in platform:
            name = query_shadow(figures.model, figures.model_id)
            ids = search_tasks(events, type=name).task_ids
            tasks = [task_map[i] for i in ids if i in task_map]
            live = live_queries(name, tasks, now, settings.query_timeout_s)
            rows.append(model_row(account_name, figures, live, nodes_online, prefix))
        return ModelsPage(
            at=now,
            window_s=window_s,
            last=last,
            flower_since=self.pages.since,
            queries_url=tasks_url(prefix, ALL_QUERIES),
            models=rows,
        )


class ModelsView(ModelsHandler):
    """``/models``: one row per model (``?model=``, ``?account=`` select by name; ``?window=``
    seconds, ``?last=`` latest queries; ``?refresh=`` seconds between reloads, 0 for none)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        page = await self.figures()
        try:
            refresh = max(0, int(self.get_argument("refresh", str(DEFAULT_REFRESH_S))))
        except ValueError:
            raise tornado.web.HTTPError(400, "refresh is a number of seconds") from None
        if refresh:
            self.set_header("Refresh", str(refresh))  # the browser reloads the page (with its login)
        api_url = self.reverse_url(PAGE_NAME).removesuffix("/models") + "/api/models"
        self.render(
            PAGE_TEMPLATE,
            page=page,
            refresh=refresh,
            active_tab="models",
            api_url=api_url,
            read_at=_clock(page.at, "%H:%M:%S"),
            since=_clock(page.flower_since, "%Y-%m-%d %H:%M:%S"),
        )


class ModelsApi(ModelsHandler, BaseApiHandler):  # type: ignore[misc]
    """``/api/models``: the page's figures as JSON (:class:`ModelsPage`)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        page = await self.figures()
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.write(page.model_dump_json())


def _clock(at: float, layout: str) -> str:
    return datetime.fromtimestamp(at, UTC).strftime(layout + " UTC")


def add_pages(app: Any, ctx: PlatformContext) -> Pages:
    """Add the Models page and its JSON to a :class:`flower.app.Flower` (before it serves);
    returns what their handlers share."""
    pages = Pages(ctx, time.time())
    handlers: list[Any] = [
        tornado.web.url(r"/models", ModelsView, {"pages": pages}, name=PAGE_NAME),
        (r"/api/models", ModelsApi, {"pages": pages}),
    ]
    if app.options.url_prefix:
        handlers = [rewrite_handler(h, app.options.url_prefix) for h in handlers]
    app.add_handlers(r".*", handlers)  # before Flower's own rules, its catch-all 404 among them
    app.settings["template_loader"] = PagesLoader()
    return pages


class NoLogin(Exception):
    """Flower would serve the Models page, every tenant's models, to whoever reaches it."""


def run_flower(capp: Celery, ctx: PlatformContext, argv: list[str], *, require_login: bool = True) -> None:
    """Flower's command (``celery flower``), step by step with Flower's own functions, with
    the pages added: ``argv`` are Flower's options. Refused (:class:`NoLogin`) when they set no
    login (basic auth or OAuth), unless ``require_login`` is off: Flower itself would serve
    without one, and the Models page names every tenant's accounts, models and workers."""
    from flower import command
    from flower.urls import settings  # type: ignore[import-untyped]
    from tornado.options import options

    command.apply_env_options()
    command.apply_options("cipherpool flower", argv)
    if require_login and not (options.basic_auth or options.auth):
        raise NoLogin(
            "Flower would show every tenant's models without a login: set FLOWER_BASIC_AUTH=user:password "
            "(or Flower's --basic-auth, or its OAuth options), or pass --no-login behind a proxy that authenticates."
        )
    command.extract_settings()
    command.setup_logging()
    app = Flower(capp=capp, options=options, **settings)
    add_pages(app, ctx)
    atexit.register(app.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    port = app.start_http_server()
    command.print_banner(capp, "ssl_options" in settings, port)
    try:
        app.start()
    except (KeyboardInterrupt, SystemExit):
        pass
