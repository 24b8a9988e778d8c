"""`cipherpool pool`: run a pool node from a profile, list the profiles.

``pool node`` is a convenience, not a supervisor: it replaces itself with the plain
``celery worker`` line of the profile (``--print`` shows that line instead), so a process
manager (systemd, a container runtime) sees celery itself and signals reach it directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import click

from cipherpool.api.schemas import NodeOut
from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.config.profiles import NodeProfile, load_profiles, node_command, node_environment, resolve_profile, shell_line
from cipherpool.config.settings import settings_env
from cipherpool.files import private_umask

PROFILE_COLUMNS = ["name", "host_class", "concurrency", "threads", "key_cache_bytes", "labels", "shared"]
LOGLEVELS = ["debug", "info", "warning", "error", "critical"]
CLIENT_ONLY = {"CIPHERPOOL_API_KEY", "CIPHERPOOL_TOKEN", "CIPHERPOOL_URL"}  # credentials a node has no use for

profiles_option = click.option(
    "--profiles",
    "profiles_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Profiles file (default: CIPHERPOOL_PROFILES_FILE, else <data dir>/profiles.toml).",
)


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    """Become ``argv`` (a seam: tests replace it)."""
    os.execvpe(argv[0], argv, env)


def _profiles_file(ctx: CliContext, given: Path | None) -> Path | None:
    """The file named on the command line or in the settings, absolute; None: the default one."""
    chosen = given or ctx.settings.profiles_file
    return None if chosen is None else Path(chosen).expanduser().absolute()


@click.group()
def pool() -> None:
    """Pool nodes: run one from a profile, list profiles."""


@pool.command("node")
@click.option(
    "--profile",
    "profile_name",
    envvar="CIPHERPOOL_NODE_PROFILE",
    help="Profile to run (default: CIPHERPOOL_NODE_PROFILE). `cipherpool pool profiles` lists them.",
)
@click.option("--name", "node_name", help="Node name (default: PROFILE@%h; Celery expands %h to the host name).")
@profiles_option
@click.option("--loglevel", type=click.Choice(LOGLEVELS, case_sensitive=False), default="info", show_default=True)
@click.option("--print", "print_only", is_flag=True, help="Print the equivalent shell line instead of running it.")
@pass_ctx
def node(
    ctx: CliContext, profile_name: str | None, node_name: str | None, profiles_file: Path | None, loglevel: str, print_only: bool
) -> None:
    """Run a pool node of a profile: a `celery worker` on the pool queue, in this process."""
    if not profile_name:
        raise click.UsageError("Name a profile: --profile NAME or CIPHERPOOL_NODE_PROFILE (see `cipherpool pool profiles`).")
    file = _profiles_file(ctx, profiles_file)
    profile = resolve_profile(ctx.settings.model_copy(update={"node_profile": profile_name, "profiles_file": file}))
    argv = node_command(profile, node_name or f"{profile.name}@%h", loglevel=loglevel.lower())
    node_env = node_environment(profile, file)
    if print_only:
        click.echo(shell_line(argv, node_env))
        return
    # The node sees the settings this command resolved (global --broker-url, --data-dir
    # included), as `cipherpool up` gives its nodes, less the client's credentials.
    settings = {k: v for k, v in settings_env(ctx.settings).items() if k not in CLIENT_ONLY}
    private_umask()  # what the node writes (model directories, logs) is private, as under `up`
    _exec(argv, {**os.environ, **settings, **node_env})


@pool.command("profiles")
@profiles_option
@pass_ctx
def profiles(ctx: CliContext, profiles_file: Path | None) -> None:
    """The profiles of the profiles file."""
    file = _profiles_file(ctx, profiles_file) or ctx.settings.effective_profiles_file()
    ctx.emit([_row(p) for p in load_profiles(file).values()], PROFILE_COLUMNS)


def _row(profile: NodeProfile) -> dict[str, object]:
    return {
        "name": profile.name,
        "host_class": profile.host_class,
        "concurrency": profile.concurrency,
        "threads": profile.threads,
        "key_cache_bytes": profile.key_cache_bytes,
        "labels": ",".join(f"{k}={v}" for k, v in profile.labels.items()) or None,
        "shared": profile.shared,
        "model_cache_bytes": profile.model_cache_bytes,
    }


NODE_COLUMNS = [
    "name",
    "profile",
    "host_class",
    "labels",
    "status",
    "slots",
    "free_slots",
    "cores",
    "memory",
    "gpus",
    "gpu_build",
    "model",
    "worker_id",
    "worker_status",
    "heartbeat_age_s",
]


@pool.command("nodes")
@click.option(
    "--all", "everything", is_flag=True, help="Operator's view from the database (every account's bindings), not the gateway's."
)
@pass_ctx
def nodes(ctx: CliContext, everything: bool) -> None:
    """Every pool node: profile, class, labels, capacity and allocatable, status, bound model
    and worker (yours; with --all every account's), heartbeat age."""
    listed = ctx.admin().list_nodes() if everything else ctx.management().list_nodes()
    if ctx.as_json:
        ctx.emit(listed)
        return
    rows = [
        {
            **n.model_dump(mode="json"),
            "labels": ",".join(f"{k}={v}" for k, v in n.labels.items()) or "-",
            "slots": n.capacity.slots,
            "free_slots": n.allocatable.slots,
            "cores": n.capacity.cores,
            "memory": f"{n.capacity.memory_bytes / 2**30:.1f} GiB",
            "gpus": n.capacity.gpus,
            "gpu_build": "yes" if n.gpu_build else "-",
            "model": n.model or ("(busy)" if n.busy else _loaded(n)),
        }
        for n in listed
    ]
    ctx.emit(rows, NODE_COLUMNS)


def _loaded(node: NodeOut) -> str:
    """A shared node's loaded models, where a dedicated node shows its one."""
    return ", ".join(f"{m.model} v{m.version}" for m in node.shared_models) or "-"
