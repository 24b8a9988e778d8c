"""`cipherpool gateway`: run the HTTP gateway on its own (as `up` does for the embedded stack).

The same as ``uvicorn --factory cipherpool.gateway.app:create_app --host H --port P`` with
the CIPHERPOOL_* environment of the platform (broker, database, limits).
"""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.files import private_umask


@click.group()
def gateway() -> None:
    """The HTTP gateway (the platform's one door for providers and end users)."""


@gateway.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 exposes it).")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
@pass_ctx
def serve(ctx: CliContext, host: str, port: int, log_level: str) -> None:
    """Serve the gateway in the foreground until interrupted."""
    import uvicorn

    from cipherpool.gateway.app import create_app

    private_umask()
    uvicorn.run(create_app(ctx.settings), host=host, port=port, log_level=log_level)
