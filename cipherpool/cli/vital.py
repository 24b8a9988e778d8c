"""`cipherpool up` never goes on silently without beat or the control worker.

The supervisor gives a child up when it keeps dying at start (:mod:`cipherpool.stack.supervisor`).
For a pool node or Flower one line says so; without beat or the control worker, though, the
platform still answers queries while billing, the reconciler, schedules, alerts and the
autoscaler have stopped, which nobody would notice. So `up` says it loudly on stderr, at once
and again every :data:`REPEAT_S` for as long as `up` runs, naming the log to read. (The
gateways' watchdog records it as a platform event too, and `cipherpool status` shows it.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import click

from cipherpool.stack.supervisor import Child, Clock

VITAL = ("beat", "control")  # the children whose absence stops beat's jobs
REPEAT_S = 60.0
RULE = "=" * 78


class VitalAlarm:
    """Receives every child the supervisor gives up (``on_give_up``), and shouts about the vital ones."""

    def __init__(
        self,
        jobs: list[str],
        clock: Clock = time.monotonic,
        echo: Callable[[str], None] = lambda line: click.echo(line, err=True),
    ) -> None:
        self.jobs, self.clock, self.echo = jobs, clock, echo
        self.down: dict[str, tuple[Child, float]] = {}  # name -> (child, when it was given up)

    def given_up(self, child: Child) -> None:
        self.echo(f"error: {child.name} keeps exiting at start; not restarting it. See {child.log_path}")
        if child.name in VITAL:
            self.down[child.name] = (child, self.clock())
            self.shout(child.name)

    def shout(self, name: str) -> None:
        child, since = self.down[name]
        minutes = (self.clock() - since) / 60
        ago = "just now" if minutes < 1 else f"{minutes:.0f} min ago"
        what = "beat is not sending" if name == "beat" else "no control worker runs"
        self.echo(
            "\n".join(
                [
                    RULE,
                    f"ERROR: {name} is DOWN and will not be restarted: it kept exiting at start (given up {ago}).",
                    f"  {what} beat's jobs ({', '.join(self.jobs)}): nothing is billed, lost nodes are not replaced,",
                    "  schedules, alerts and autoscaling have stopped. Queries are still served.",
                    f"  Read its log: {child.log_path}",
                    "  Fix the cause and restart `cipherpool up`; `cipherpool status` shows the platform's state.",
                    RULE,
                ]
            )
        )

    def repeat(self, stop: threading.Event, interval_s: float = REPEAT_S) -> None:
        """Shout again every ``interval_s`` until ``stop`` is set (a daemon thread of `up`)."""
        while not stop.wait(interval_s):
            for name in list(self.down):
                self.shout(name)
