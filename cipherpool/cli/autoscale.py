"""`cipherpool model autoscale NAME`: show a model's autoscaling, turn it on or change it,
or turn it off (``--off``). Durations as everywhere in the CLI: ``5s``, ``1m``, ``1h30m``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import DURATION, parse_duration
from cipherpool.client.management import UNSET

OFF = "off"  # what clears a target (also "none")


class Target(click.ParamType[Any, Any]):
    """A target, or ``off`` to clear it: a duration (the queue wait) or a count (the depth)."""

    def __init__(self, name: str, parse: Callable[[str], float | int]):
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | int | str:
        if not isinstance(value, str):
            return value  # type: ignore[no-any-return]  # converted already
        if value.strip().lower() in (OFF, "none"):
            return OFF
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(f"{exc}; or `off` to clear this target", param, ctx)


def _count(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(f"{text!r} is not a count of 1 or more")
    return number


WAIT = Target("duration|off", parse_duration)
DEPTH = Target("count|off", _count)


def _target(value: float | int | str | None) -> Any:
    """As :meth:`ManagementClient.set_autoscale` takes a target: left out (UNSET), cleared
    (None, from ``off``) or a value."""
    if value is None:
        return UNSET
    return None if value == OFF else value


@click.command("autoscale")
@click.argument("name")
@click.option("--off", is_flag=True, help="Turn autoscaling off (workers stay; the settings are kept).")
@click.option(
    "--target-wait", type=WAIT, help="Add a worker while the average queue wait stays above this (e.g. 5s); `off` clears it."
)
@click.option("--target-depth", type=DEPTH, help="... or while more than this many queries wait per worker; `off` clears it.")
@click.option("--up-after", type=DURATION, help="How long a target must be exceeded before adding (e.g. 30s).")
@click.option("--idle-after", type=DURATION, help="No query and an empty queue this long: remove one (e.g. 5m).")
@click.option("--cooldown-up", type=DURATION, help="After any change, wait this long before adding (e.g. 1m).")
@click.option("--cooldown-down", type=DURATION, help="After any change, wait this long before removing (e.g. 5m).")
@pass_ctx
def autoscale(
    ctx: CliContext,
    name: str,
    off: bool,
    target_wait: float | str | None,
    target_depth: int | str | None,
    up_after: float | None,
    idle_after: float | None,
    cooldown_up: float | None,
    cooldown_down: float | None,
) -> None:
    """Show NAME's autoscaling; with options, turn it on or change it (what is not given keeps
    its value); with --off, turn it off. Beat adds or removes one worker at a time, between the
    model's --min-workers and --max-workers (`cipherpool model update`), and records each
    decision with its reason in the model's events."""
    client = ctx.management()
    given = any(v is not None for v in (target_wait, target_depth, up_after, idle_after, cooldown_up, cooldown_down))
    if off and given:
        raise click.UsageError("--off takes no other option.")
    if off:
        ctx.emit(client.disable_autoscale(name))
    elif given:
        ctx.emit(
            client.set_autoscale(
                name,
                target_queue_wait_s=_target(target_wait),
                target_queue_depth=_target(target_depth),
                scale_up_after_s=up_after,
                idle_after_s=idle_after,
                cooldown_up_s=cooldown_up,
                cooldown_down_s=cooldown_down,
            )
        )
    else:
        ctx.emit(client.get_autoscale(name))
