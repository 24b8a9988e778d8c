"""How a node's FHE runs use the cores: OpenMP's team size and its idle spin.

Concrete's runtime parallelises a circuit with LLVM's OpenMP (``libomp``). Two of its
environment variables matter to a server that shares a host with other processes, and both
must be set before the runtime starts its first parallel region:

* ``OMP_NUM_THREADS``: the team of one execution (architecture.md, "Threads per execution").
* ``KMP_BLOCKTIME``: how long a team's idle threads spin before they sleep. ``libomp``'s
  default is 200 ms, so each query left one core busy-waiting for 200 ms after its answer
  (measured on digits with 2 threads: 190 ms of CPU in the 300 ms after each run, against
  0.1 ms with 0). That is the core the answer's way back needs (the node's result write,
  Redis, the gateway, the client) and another node's on a shared host. Sleeping at once cost
  a digits run nothing measurable (docs/performance.md), so a node spins 0 ms by default
  (``CIPHERPOOL_NODE_SPIN_MS`` sets it: the setting wins over a ``KMP_BLOCKTIME`` in the
  node's environment, as ``OMP_NUM_THREADS`` follows the profile).
"""

from __future__ import annotations


def openmp_env(threads: int | None, spin_ms: int) -> dict[str, str]:
    """The environment a node sets before concrete first runs: its team size (when the profile
    or settings name one; else OpenMP's default, every core) and its idle spin in ms."""
    env = {"KMP_BLOCKTIME": str(max(0, spin_ms))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
