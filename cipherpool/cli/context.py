"""The object every CLI command shares: settings (env, then global options) and clients."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from cipherpool.config.settings import Settings
from cipherpool.errors import CipherpoolError, InvalidInput

if TYPE_CHECKING:  # for the annotations; the methods below import the clients when called
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
    """Turns a CipherpoolError anywhere below into one line on stderr and its exit code (a
    request the client refuses to send, as the gateway would, into an invalid_input one)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CipherpoolError as exc:
            click.echo(f"error [{exc.code}]: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except ValidationError as exc:  # a request body the client checks before sending it
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            invalid = InvalidInput(f"Invalid request: {problems}")
            click.echo(f"error [{invalid.code}]: {invalid.message}", err=True)
            ctx.exit(invalid.exit_code)
        finally:
            if isinstance(ctx.obj, CliContext) and ctx.parent is None:
                ctx.obj.close()


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


def read_array(path: Path) -> NDArray[Any]:
    """A plaintext input: .npy, or numbers separated by commas or white space."""
    try:
        if path.suffix == ".npy":
            array: NDArray[Any] = np.load(path, allow_pickle=False)  # a .npy file holds one array
            return array
        lines = [line.replace(",", " ").split() for line in path.read_text().splitlines() if line.strip()]
        rows = np.array([[float(v) for v in line] for line in lines])
        return rows[0] if len(rows) == 1 else rows
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"Cannot read numbers from {path}: {exc}") from None


pass_ctx = click.make_pass_decorator(CliContext)
