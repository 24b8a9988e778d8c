"""What concrete's runtime does to the process that runs it, undone.

concrete evaluates circuits on a dataflow runtime (HPX) that it starts at the first FHE run
in a process. Starting it changes two things that a long-lived server cannot live with:

* **SIGPIPE.** Python ignores SIGPIPE, so a write to a closed socket is an ``OSError`` that
  kombu, redis-py and Celery handle (reconnect, retry). The runtime installs its own handler,
  which prints a stack trace and kills the process (exit 139): after one query, a pool node
  died on the first broken broker connection (a partition, a broker restart).
* **The exit status.** ``concrete.compiler`` registers an ``atexit`` handler that stops the
  runtime, and stopping it calls ``exit(0)``: a process that ran one evaluation exits 0
  whatever it meant (``sys.exit(1)``, a failed test run, a node's failure exit).

:func:`after_fhe` puts both back: SIGPIPE ignored again (through libc, because Python's
``signal.signal`` works only in the main thread and nodes evaluate in pool threads), and the
process left with the status it meant: concrete's handler unregistered, and ``_exit`` added
as a C exit handler so the runtime's own C++ teardown (threads still running) is skipped once
Python has finished its own cleanup. Every process of the project that may evaluate calls it
after loading or running a circuit (the evaluator does), and entry points call
:func:`keep_exit_status` before they leave. Both are cheap and idempotent.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import signal
import sys
import threading

log = logging.getLogger("cipherpool.fhe")
SIG_IGN = 1  # the C value of SIG_IGN
_lock = threading.Lock()
_c_exit_registered = False


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a platform without a C library to load
        return None


_LIBC = _libc()
if _LIBC is not None:
    _LIBC.signal.restype = ctypes.c_void_p
    _LIBC.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]


def ignore_sigpipe() -> None:
    """SIGPIPE ignored again, for the whole process, from whichever thread calls it."""
    if _LIBC is not None:
        _LIBC.signal(signal.SIGPIPE, ctypes.c_void_p(SIG_IGN))


def block_sigpipe() -> None:
    """Block SIGPIPE in the calling thread, and so in every thread it starts from now on.

    A pool node calls it at start, before its execution threads exist: a write to a broken
    connection during the first FHE run (before :func:`after_fhe` could put SIGPIPE back) then
    leaves the signal pending instead of delivering it to the runtime's handler, and the write
    fails with EPIPE as it should."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})


def sigpipe_ignored() -> bool:
    """Whether SIGPIPE is ignored now (read from the kernel: Python's own record of the
    handler does not see what a C library installed)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGPIPE - 1) & 1)
    except OSError:  # pragma: no cover - no /proc
        pass
    return signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN


def keep_exit_status() -> None:
    """Make this process exit with the status it means, even after an FHE run.

    Unregisters concrete's ``atexit`` handler (it stops the runtime with ``exit(0)``), and
    once, registers ``_exit`` with glibc's ``on_exit``: after Python's finalization (its own
    ``atexit`` handlers, flushed streams), C's ``exit(status)`` calls ``_exit(status)``
    before the runtime's C++ teardown can run or change the status."""
    global _c_exit_registered
    compiler = sys.modules.get("concrete.compiler")
    terminate = getattr(compiler, "_terminate_df_parallelization", None)
    if terminate is not None:
        atexit.unregister(terminate)
    with _lock:
        if _c_exit_registered or _LIBC is None:
            return
        on_exit = getattr(_LIBC, "on_exit", None)
        if on_exit is None:  # pragma: no cover - not glibc: the status is kept, the C++ teardown runs
            _c_exit_registered = True
            return
        on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        # _exit(int) called as a (int status, void *arg) handler: the extra argument is ignored.
        if on_exit(ctypes.cast(_LIBC._exit, ctypes.c_void_p), None) != 0:  # pragma: no cover
            log.warning("could not register the exit-status guard")
        _c_exit_registered = True


def after_fhe() -> None:
    """Undo what a circuit's load or run did to the process (see the module's docstring)."""
    ignore_sigpipe()
    keep_exit_status()
