"""A supervised Python child that cannot outlive its supervisor.

``python -m cipherpool.stack.child --parent PID --grace S MODULE [ARG...]`` runs ``MODULE``
in this very process as ``python -m MODULE ARG...`` would (the supervisor's pid is the
module's), after starting a guard against being left behind.

Why: the kernel sends each child SIGTERM when its supervisor dies (``PR_SET_PDEATHSIG``, set
by :mod:`cipherpool.stack.supervisor`), but SIGTERM asks for a graceful stop, and a graceful
stop may never end: a Celery worker finishes the task it runs, and with the broker gone too
(the embedded Redis dies with the same supervisor) kombu retries its connection without
limit. A live supervisor turns SIGTERM into SIGKILL after its grace period
(``Supervisor.stop_all``); a SIGKILLed one cannot, so the child does it for itself: a daemon
thread sees that its parent is no longer the supervisor and, once the same grace has passed,
SIGKILLs the child's own process group (the child leads it, so what it forked goes too).

The guard also covers the one gap in ``PR_SET_PDEATHSIG``: a supervisor that died before the
child asked for the signal. The child then sends itself the SIGTERM it missed.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 0.5  # how soon a lost supervisor is seen; the grace period dwarfs it


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cipherpool.stack.child", description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    parser.add_argument("--grace", type=float, required=True, help="seconds between the supervisor's death and SIGKILL")
    parser.add_argument("module", help="the module to run, as `python -m MODULE`")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return parser.parse_args(argv)


def guard(parent: int, grace_s: float, poll_s: float = POLL_S) -> threading.Thread:
    """Start the daemon thread that kills this process group ``grace_s`` after ``parent``
    stops being this process's parent (an orphan is re-parented to init or a subreaper)."""
    if os.getppid() != parent:  # gone before the kernel was asked to tell us
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="cipherpool-orphan-guard", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    guard(args.parent, args.grace)
    sys.argv = [args.module, *args.args]  # runpy puts the module's path first, as -m does
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
