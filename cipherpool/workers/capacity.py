"""What a node's host has: cores, memory and GPUs, as this process may use them.

A profile's threads default to ``cores ÷ concurrency`` and its caches are bounded in bytes, so
the figures must be the ones the process is held to, not the machine's: the CPU affinity mask
(taskset, a container's cpuset) and the cgroup v2 memory limit. Each probe is small, never
raises (a host that hides a figure gets a safe fallback), and takes its paths as parameters so
tests can point it at files of their own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Whether concrete's GPU build runs here: the GPU backend's capability probe, which lives with it.
from cipherpool.backends.gpu import concrete_gpu_available as concrete_gpu_available

CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: bytes, or "max" for no limit
DEV_DIR = Path("/dev")
_NVIDIA_DEVICE = re.compile(r"nvidia[0-9]+")  # one per GPU; nvidiactl, nvidia-uvm are not GPUs


@dataclass(frozen=True)
class Capacity:
    cores: int  # cores this process may run on (>= 1)
    memory_bytes: int  # memory it may use; 0 when the host does not say
    gpus: int  # GPUs it may see


def detect(
    *, cgroup_memory_max: Path = CGROUP_MEMORY_MAX, dev_dir: Path = DEV_DIR, environ: Mapping[str, str] | None = None
) -> Capacity:
    """This host's capacity, as seen by this process."""
    return Capacity(
        cores=cpu_cores(), memory_bytes=memory_bytes(cgroup_memory_max), gpus=gpu_count(dev_dir=dev_dir, environ=environ)
    )


def cpu_cores() -> int:
    """Cores in this process's affinity mask; where the OS has none, the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS), or refused
        return max(1, os.cpu_count() or 1)


def memory_bytes(cgroup_memory_max: Path = CGROUP_MEMORY_MAX, physical: int | None = None) -> int:
    """The smaller of the cgroup limit and physical memory (``physical``: None probes it)."""
    total = physical_memory_bytes() if physical is None else physical
    limit = cgroup_memory_limit(cgroup_memory_max)
    if limit is None:
        return total
    return limit if total <= 0 else min(limit, total)


def cgroup_memory_limit(path: Path = CGROUP_MEMORY_MAX) -> int | None:
    """The cgroup v2 memory limit in bytes; None for "max", no cgroup v2, or an unreadable file."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def physical_memory_bytes() -> int:
    """The machine's memory; 0 when the OS does not say."""
    try:
        return max(0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def gpu_count(dev_dir: Path = DEV_DIR, environ: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use: those CUDA_VISIBLE_DEVICES names when it is set, else the
    NVIDIA device files (``/dev/nvidia0``, ``/dev/nvidia1``, ...)."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible_device_count(visible)
    try:
        return sum(1 for entry in os.listdir(dev_dir) if _NVIDIA_DEVICE.fullmatch(entry))
    except OSError:
        return 0


def visible_device_count(value: str) -> int:
    """Devices named by a CUDA_VISIBLE_DEVICES value. As CUDA reads it, the list stops at the
    first invalid entry: ``""`` and ``"-1"`` hide every GPU, ``"0,-1,1"`` shows one."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count
