"""`cipherpool flower`: Flower, Celery's monitor, with cipherpool's Models page (what `up` runs).

The same as ``celery -A cipherpool.tasks flower`` (Flower's options after the command,
``FLOWER_*`` in the environment, ``--conf``), plus ``/models``: per model, workers up,
queries in the window and all-time, average and current query time, queue wait and
refusals, behind Flower's own login (:mod:`cipherpool.monitoring.flower_pages`).
"""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h"]})
@click.option(
    "--no-login",
    is_flag=True,
    help="serve without a login (the Models page names every tenant's models): only behind a proxy that authenticates",
)
@click.argument("flower_options", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def flower(ctx: CliContext, no_login: bool, flower_options: tuple[str, ...]) -> None:
    """Serve Flower with the Models page (/models; JSON at /api/models) until interrupted.

    FLOWER_OPTIONS are Flower's own, e.g. --address=127.0.0.1 --port=5555 (--help lists them);
    set FLOWER_BASIC_AUTH=user:password (or Flower's OAuth options) for its login."""
    from cipherpool.config.celery import create_app
    from cipherpool.context import PlatformContext
    from cipherpool.monitoring.flower_pages import NoLogin, run_flower

    try:
        run_flower(
            create_app(ctx.settings, name="cipherpool-flower"),
            PlatformContext(ctx.settings),
            list(flower_options),
            require_login=not no_login,
        )
    except NoLogin as exc:
        raise click.UsageError(str(exc)) from None
