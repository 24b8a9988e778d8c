"""Node profiles: what each pool node is, described once in a TOML file.

A pool node's speed depends on a choice only the operator can make (docs/architecture.md, 'Threads per execution'): concrete
runs a circuit with OpenMP over every core, so a node that runs ``concurrency`` executions
at once must give each ``cores ÷ concurrency`` threads. More executions raise throughput a
little and latency a lot. A profile names one such choice, with the node's host class
(cpu/gpu), its key-cache bound and labels that models select nodes by::

    [profiles.cpu-small]
    host_class = "cpu"        # a host class of cipherpool.backends: cpu | gpu
    concurrency = 1           # parallel executions per node
    threads = 2               # threads per execution; omitted: cores // concurrency (>= 1)
    key_cache = "4GiB"        # bytes, or a size with B/KB/MB/GB/TB/KiB/MiB/GiB/TiB
    labels = { zone = "a", disk = "ssd" }
    shared = false            # a shared node loads models on demand (no dedicated worker)
    model_cache = "2GiB"      # shared nodes: bound of the loaded-model LRU
    rate = "1.5"              # credits per hour of a worker up here (default: the class's)
    standby_rate = "0.2"      # credits per hour of a worker on standby here
    execution_rate = "0.001"  # shared nodes: credits per second of computation

A node is started with ``CIPHERPOOL_NODE_PROFILE=cpu-small`` (``cipherpool pool node``
prints or runs the line); without a profile it takes the same facts from plain settings.
The file is the one place they are spelled, so every host of a pool reads the same truth.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from cipherpool import backends
from cipherpool.config.settings import GIB, Settings
from cipherpool.errors import ConfigurationError
from cipherpool.names import POOL_QUEUE

DEFAULT_PROFILE = "default"  # the profile a node without CIPHERPOOL_NODE_PROFILE builds from settings
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # a profile's name: also part of a node's name
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # label keys and values
SIZE_UNITS = {  # case-insensitive; KB/MB/... are powers of 1000, KiB/MiB/... of 1024
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
EXAMPLE = f"""\
[profiles.{backends.DEFAULT_HOST_CLASS}-small]
host_class = "{backends.DEFAULT_HOST_CLASS}"
concurrency = 1
key_cache = "4GiB"
"""


def parse_size(value: int | str) -> int:
    """Bytes in ``value``: an integer of bytes, or a number with a unit (``"4GiB"``, ``"1.5 GB"``).

    Raises ValueError saying what a size looks like; fractions of a byte are dropped."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size: give bytes (an integer) or a string like '4GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a size: it must not be negative")
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size: give bytes (an integer) or a number and a unit, like '512MiB' or '4GiB'")
    number, unit = match.groups()
    factor = SIZE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(f"{value!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(Decimal(number) * factor)


Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether every pair of ``selector`` is among ``labels`` (an empty selector matches all),
    as a Kubernetes node selector picks nodes."""
    return all(labels.get(key) == value for key, value in selector.items())


matches = labels_match  # the short name


class NodeProfile(BaseModel):
    """One kind of pool node. Frozen, and unknown keys are errors: a typo in the file must not
    silently leave a default in force."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    host_class: str = backends.DEFAULT_HOST_CLASS  # one of backends.host_classes()
    concurrency: int = Field(1, ge=1, le=64)
    threads: int | None = Field(None, ge=1, le=1024)
    key_cache_bytes: Size = Field(4 * GIB, validation_alias=AliasChoices("key_cache", "key_cache_bytes"))
    labels: dict[str, str] = Field(default_factory=dict)
    shared: bool = False
    model_cache_bytes: Size = Field(2 * GIB, validation_alias=AliasChoices("model_cache", "model_cache_bytes"))
    # Credits per hour of a worker on such a node (up; on standby), and per second of
    # computation on a shared one. None: the class's rate from the settings.
    rate: Decimal | None = Field(None, ge=0)
    standby_rate: Decimal | None = Field(None, ge=0)
    execution_rate: Decimal | None = Field(None, ge=0)

    @field_validator("host_class")
    @classmethod
    def _known_class(cls, host_class: str) -> str:
        return backends.host_class(host_class)

    @field_validator("labels")
    @classmethod
    def _label_syntax(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            for text in (key, value):
                if not LABEL_PATTERN.match(text):
                    raise ValueError(f"{key}={value!r}: keys and values must match {LABEL_PATTERN.pattern}")
        return labels

    def effective_threads(self, cores: int) -> int:
        """Threads per execution: the profile's, else the cores shared among the executions."""
        return self.threads if self.threads is not None else max(1, cores // self.concurrency)

    def selects(self, selector: Mapping[str, str]) -> bool:
        """Whether this profile's labels satisfy ``selector`` (see :func:`labels_match`)."""
        return matches(self.labels, selector)


def load_profiles(path: Path) -> dict[str, NodeProfile]:
    """Every profile in the TOML file at ``path``, by name; ConfigurationError saying what to fix."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(
            f"No profiles file at {path}. Create it (or point CIPHERPOOL_PROFILES_FILE elsewhere) "
            f"with one table per profile, for example:\n{EXAMPLE.rstrip()}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"Cannot read the profiles file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    return {name: _profile(path, name, table) for name, table in _tables(path, data).items()}


def _tables(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The ``[profiles.*]`` tables, after checking the file's shape."""
    extra = sorted(set(data) - {"profiles"})
    if extra:
        raise ConfigurationError(f"{path}: unknown top-level key(s) {', '.join(extra)}; profiles go in [profiles.NAME] tables")
    tables = data.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ConfigurationError(f"{path} defines no profiles; add [profiles.NAME] tables, for example:\n{EXAMPLE.rstrip()}")
    return tables


def _profile(path: Path, name: str, table: Any) -> NodeProfile:
    """One profile from its table; the table's key is its name."""
    where = f"{path}: profile {name!r}"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where}: must be a table ([profiles.{name}]), not a {type(table).__name__}")
    if "name" in table:
        raise ConfigurationError(f"{where}: name: remove it, a profile is named by its table's key")
    try:
        return NodeProfile.model_validate({**table, "name": name})
    except ValidationError as exc:
        raise ConfigurationError(f"{where}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """pydantic's errors as ``field: message`` parts, the way the file spells the fields."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        parts.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def resolve_profile(settings: Settings) -> NodeProfile:
    """This node's profile: ``settings.node_profile`` from the profiles file, else a profile
    named ``default`` built from the plain settings (host class, threads, key cache)."""
    if settings.node_profile:
        path = settings.effective_profiles_file()
        profiles = load_profiles(path)
        if settings.node_profile not in profiles:
            raise ConfigurationError(f"No profile {settings.node_profile!r} in {path}; known: {', '.join(sorted(profiles))}")
        return profiles[settings.node_profile]
    host_class = settings.host_class.strip().lower()
    if host_class not in backends.host_classes():
        known = ", ".join(backends.host_classes())
        raise ConfigurationError(f"CIPHERPOOL_HOST_CLASS={settings.host_class!r} is not a host class; use {known}")
    try:
        return NodeProfile(
            name=DEFAULT_PROFILE, host_class=host_class, threads=settings.node_threads, key_cache_bytes=settings.key_cache_bytes
        )
    except ValidationError as exc:
        raise ConfigurationError(f"Settings (CIPHERPOOL_NODE_THREADS, CIPHERPOOL_KEY_CACHE_BYTES): {_problems(exc)}") from None


def node_command(profile: NodeProfile, node_name: str, *, python: str = sys.executable, loglevel: str = "info") -> list[str]:
    """The argv of a pool node of ``profile``: a plain ``celery worker`` on the pool queue."""
    return [
        python,
        "-m",
        "celery",
        "-A",
        "cipherpool.tasks",
        "worker",
        "-Q",
        POOL_QUEUE,
        "-P",
        "threads",
        "-c",
        str(profile.concurrency),
        "-n",
        node_name,
        # A node talks to the platform through its queues and the database; gossip and mingle
        # would only add a broadcast per node at every start (as `cipherpool up` runs them).
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]


def node_environment(profile: NodeProfile, profiles_file: Path | None) -> dict[str, str]:
    """What a node needs in its environment to find its profile (the rest comes from there)."""
    env = {"CIPHERPOOL_NODE_PROFILE": profile.name}
    if profiles_file is not None:
        env["CIPHERPOOL_PROFILES_FILE"] = str(profiles_file)
    return env


def shell_line(argv: list[str], env: Mapping[str, str]) -> str:
    """``argv`` as a user would type it: assignments first, ``celery`` for ``python -m celery``.

    Only the value of an assignment is quoted: a quoted ``'NAME=value'`` is a command to the shell."""
    words = ["celery", *argv[3:]] if argv[1:3] == ["-m", "celery"] else argv
    assignments = [f"{key}={shlex.quote(value)}" for key, value in env.items()]
    return " ".join([*assignments, shlex.join(words)])
