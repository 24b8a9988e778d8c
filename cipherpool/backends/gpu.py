"""The GPU: a circuit compiled with ``device="cuda"`` (concrete's configuration says
``use_gpu``). It runs on gpu nodes whose concrete has its GPU build and sees a CUDA device.

The node must honour what the provider compiled for rather than choose: a GPU compilation
picks its own crypto parameters, so the client's keys fit only that backend, and concrete's
CPU build would compile such a circuit for the CPU anyway ("continuing without GPU
acceleration")."""

from __future__ import annotations

import functools
from decimal import Decimal

from cipherpool.backends.base import Backend, Configuration, Rates


@functools.cache
def concrete_gpu_available() -> bool:
    """Whether concrete's GPU build is installed and sees a CUDA device. Imports concrete
    (seconds, and its memory) on first call, so only processes that will run FHE ask; asked
    once per process (a driver does not appear under a running process)."""
    try:
        from concrete.compiler import check_gpu_available, check_gpu_enabled

        return bool(check_gpu_enabled()) and bool(check_gpu_available())
    except Exception:  # not installed, a CPU-only wheel, a broken driver: no usable GPU
        return False


def asks_for_the_gpu(configuration: Configuration) -> bool:
    return configuration.get("use_gpu") is True  # only a real true: "yes" is not


BACKEND = Backend(
    name="gpu",
    host_class="gpu",
    target='the GPU (device="cuda")',
    probe=concrete_gpu_available,
    compiled_for=asks_for_the_gpu,
    needs="concrete's GPU build",
    absent="has no GPU build of concrete, or sees no GPU",
    remedy="install concrete-python's GPU wheel on a gpu node and restart it",
    rates=Rates(per_hour=Decimal("4"), standby_per_hour=Decimal("0.4"), execution_per_s=Decimal("0.004")),
)
