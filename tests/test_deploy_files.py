"""The systemd units and the env file of deploy/systemd, held against the code they start.

A unit that names a subcommand or a flag the CLI does not have fails only when an operator
starts it, on a host, at night; a setting misspelt in the env file is silently ignored
(pydantic-settings drops unknown CIPHERPOOL_* variables). So every ExecStart is resolved here
as systemd would (specifiers, ``${VAR}`` from the unit's own Environment=) and parsed by the
real command: ``cipherpool ...`` by the click group ``cipherpool.cli.cli``, ``celery ...`` by
Celery's own click group (and Flower's tornado options); every CIPHERPOOL_* name in the files
must be a field of :class:`Settings`; and ``systemd-analyze verify`` reads the units where
it is installed. docs/operations.md ("Running under systemd") explains the files.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cipherpool import names
from cipherpool.cli import cli
from cipherpool.config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "systemd"
ENV_EXAMPLE = DEPLOY / "cipherpool.env.example"
OPERATIONS = ROOT / "docs" / "operations.md"
VENV_BIN = "/opt/cipherpool/venv/bin/"  # where the units expect the platform's virtual environment
ENV_FILE = "/etc/cipherpool/cipherpool.env"
INSTANCE = "cpu-small"  # a profile name, for the node template's %i
SERVICES = sorted(DEPLOY.glob("*.service"))
LONG_RUNNING = [p for p in SERVICES if p.name != "cipherpool-migrate.service"]
SETTING_NAMES = {f"CIPHERPOOL_{name.upper()}" for name in Settings.model_fields}
SETTING_PATTERN = re.compile(r"\bCIPHERPOOL_[A-Z0-9_]*[A-Z0-9]")
LOG_FLAGS = {"--log-level", "--loglevel", "-l", "--logging"}
# What an operator must set: the rest has defaults that fit a cluster.
REQUIRED = {
    "CIPHERPOOL_DATA_DIR",
    "CIPHERPOOL_BROKER_URL",
    "CIPHERPOOL_DATABASE_URL",
    "CIPHERPOOL_BLOB_STORE",
    "CIPHERPOOL_METRICS_TOKEN",
    "FLOWER_BASIC_AUTH",
}
SECRETS = {
    "CIPHERPOOL_BROKER_URL",
    "CIPHERPOOL_STORE_URL",
    "CIPHERPOOL_RESULT_BACKEND",
    "CIPHERPOOL_DATABASE_URL",
    "CIPHERPOOL_S3_SECRET_ACCESS_KEY",
    "CIPHERPOOL_METRICS_TOKEN",
    "FLOWER_BASIC_AUTH",
}


# -- reading the files ---------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with every value it is given (systemd allows a key
    several times; configparser does not). Comments, blank lines and continuations handled."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        assert "=" in line, f"{path.name}: {line!r} is not KEY=VALUE"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be given once, is {values}"
    return values[0]


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    """Every space-separated word of every ``key=`` line (After=, Wants=, ...)."""
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    """The unit's own Environment= assignments (the env file may override them at run time)."""
    env = {}
    for value in unit.get("Service", {}).get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def exec_start(path: Path) -> list[str]:
    """ExecStart as the argv systemd runs: its prefixes dropped, specifiers (%% %i) and
    ${VAR}/$VAR from the unit's Environment= expanded (every variable must have a value there,
    or a missing env-file line would turn into an empty argument)."""
    unit = parse_unit(path)
    line = one(unit, "Service", "ExecStart").lstrip("-@:+!")
    env = environment(unit)

    def specifier(match: re.Match[str]) -> str:
        code = match.group(1)
        if code == "%":
            return "%"
        if code in "iI" and "@" in path.name:
            return INSTANCE
        raise AssertionError(f"{path.name}: specifier %{code} in ExecStart is not resolved by this test")

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"{path.name}: ExecStart uses ${name}, which the unit's Environment= does not set"
        return env[name]

    argv = []
    for word in shlex.split(line):
        word = re.sub(r"%(.)", specifier, word)
        argv.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, word))
    return argv


def env_example() -> dict[str, str]:
    """The example's assignments: its uncommented lines, each KEY=VALUE, each key once."""
    assignments = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*=\S.*", line), f"{ENV_EXAMPLE.name}: {line!r} is not KEY=VALUE"
        key, _, value = line.partition("=")
        assert key not in assignments, f"{ENV_EXAMPLE.name}: {key} is set twice"
        assignments[key] = value
    return assignments


def flags(args: list[str]) -> list[str]:
    """The option names among ``args`` (``--port=5555`` -> ``--port``)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "-"]


def option_names(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}


def split_group(group: click.Group, args: list[str]) -> tuple[list[str], str, list[str]]:
    """(the group's own options, the subcommand, its arguments) for ``group args``."""
    own: list[str] = []
    i = 0
    params = {name: p for p in group.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}
    while i < len(args) and args[i].startswith("-"):
        name = args[i].split("=", 1)[0]
        assert name in params, f"{name} is not an option of {group.name}: {sorted(params)}"
        takes_value = not params[name].is_flag and "=" not in args[i]
        own += args[i : i + 1 + takes_value]
        i += 1 + takes_value
    assert i < len(args), f"no subcommand after {own}"
    return own, args[i], args[i + 1 :]


# -- the units ------------------------------------------------------------------------------------


def test_every_component_has_its_unit():
    found = {p.name for p in DEPLOY.iterdir()}
    assert {
        "cipherpool.target",
        "cipherpool-migrate.service",
        "cipherpool-gateway.service",
        "cipherpool-control.service",
        "cipherpool-node@.service",
        "cipherpool-beat.service",
        "cipherpool-flower.service",
        "cipherpool.env.example",
    } <= found


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_a_unit_runs_as_the_cipherpool_user_with_the_env_file_and_private_files(path):
    unit = parse_unit(path)
    assert one(unit, "Service", "User") == "cipherpool"
    assert one(unit, "Service", "EnvironmentFile") == ENV_FILE  # no "-": a missing file must fail the start
    assert one(unit, "Service", "UMask") == "0077"
    assert one(unit, "Service", "StateDirectory") == "cipherpool"
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert environment(unit)["CIPHERPOOL_DATA_DIR"] == "/var/lib/cipherpool"  # the StateDirectory, never ~/.cipherpool
    assert {"network-online.target"} <= set(words(unit, "Unit", "After")) & set(words(unit, "Unit", "Wants"))
    assert "cipherpool.target" in words(unit, "Install", "WantedBy")
    # No secret in the unit: `systemctl show` prints Environment= to every user.
    assert not SECRETS & set(environment(unit)), f"{path.name}: a secret belongs in {ENV_FILE}"


@pytest.mark.parametrize("path", LONG_RUNNING, ids=lambda p: p.name)
def test_a_long_running_unit_restarts_always_is_part_of_the_target_and_comes_after_migrations(path):
    unit = parse_unit(path)
    assert one(unit, "Service", "Restart") == "always"
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert float(one(unit, "Service", "TimeoutStopSec")) > 0
    assert "cipherpool.target" in words(unit, "Unit", "PartOf")
    assert "cipherpool-migrate.service" in words(unit, "Unit", "After")
    assert LOG_FLAGS & set(flags(exec_start(path))), f"{path.name}: without a log level it logs nothing at start"


def test_the_migration_unit_is_a_oneshot_the_database_users_want():
    unit = parse_unit(DEPLOY / "cipherpool-migrate.service")
    assert one(unit, "Service", "Type") == "oneshot"
    assert one(unit, "Service", "RemainAfterExit") == "yes"  # once per boot, not at each restart of a dependent
    assert exec_start(DEPLOY / "cipherpool-migrate.service")[1:] == ["db", "upgrade"]
    for name in ("cipherpool-gateway.service", "cipherpool-control.service", "cipherpool-node@.service"):
        assert "cipherpool-migrate.service" in words(parse_unit(DEPLOY / name), "Unit", "Wants"), name


def test_stop_timeouts_cover_a_long_poll_and_a_query_in_flight():
    fields = Settings.model_fields  # the defaults, whatever this shell's environment says
    gateway = parse_unit(DEPLOY / "cipherpool-gateway.service")
    assert float(one(gateway, "Service", "TimeoutStopSec")) > fields["long_poll_s"].default
    node = parse_unit(DEPLOY / "cipherpool-node@.service")
    assert float(one(node, "Service", "TimeoutStopSec")) > fields["visibility_timeout_s"].default


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_every_exec_start_is_a_real_command_with_real_flags(path):
    argv = exec_start(path)
    assert argv[0].startswith(VENV_BIN), f"{path.name}: {argv[0]} is not in {VENV_BIN}"
    program = argv[0].removeprefix(VENV_BIN)
    assert program in {"cipherpool", "celery"}, program
    if program == "cipherpool":
        check_cipherpool(path, argv[1:])
    else:
        check_celery(path, argv[1:])


def check_cipherpool(path: Path, args: list[str]) -> None:
    """The subcommand path exists in the click group, `--help` answers, every flag is the
    command's own and the whole line parses (values included: choices, integers)."""
    if args[:1] == ["flower"]:  # Flower's own options, passed through (cipherpool/cli/flower.py)
        check_flower_options(path, args[1:])
        return
    command: click.Command = cli
    trail: list[str] = []
    while isinstance(command, click.Group) and args and (sub := command.get_command(click.Context(command), args[0])):
        trail.append(args.pop(0))
        command = sub
    assert not isinstance(command, click.Group), f"{path.name}: `cipherpool {' '.join(trail)}` is a group, not a command"
    result = CliRunner().invoke(cli, [*trail, "--help"])
    assert result.exit_code == 0, result.output
    unknown = set(flags(args)) - option_names(command)
    assert not unknown, f"{path.name}: `cipherpool {' '.join(trail)}` has no option {sorted(unknown)}"
    command.make_context(" ".join(trail), list(args))  # raises click's UsageError on a bad value


def check_flower_options(path: Path, args: list[str]) -> None:
    import flower.options  # noqa: F401  (defines them)
    from tornado.options import options

    unknown = {f for f in flags(args) if f.removeprefix("--").split("=")[0] not in options}
    assert not unknown, f"{path.name}: Flower has no option {sorted(unknown)}"


def check_celery(path: Path, args: list[str]) -> None:
    from celery.bin.celery import celery

    own, sub, rest = split_group(celery, args)
    assert own[:2] in (["-A", "cipherpool.tasks"], ["--app", "cipherpool.tasks"]), f"{path.name}: {own}"
    assert (ROOT / "cipherpool" / "tasks" / "__init__.py").exists()
    assert sub in celery.commands, f"{path.name}: celery has no command {sub!r}"
    command = celery.commands[sub]
    if sub == "flower":  # Flower's options are tornado's, passed through celery's command
        check_flower_options(path, rest)
        return
    unknown = set(flags(rest)) - option_names(command)
    assert not unknown, f"{path.name}: `celery {sub}` has no option {sorted(unknown)}"
    if sub == "worker":
        queues = rest[rest.index("-Q") + 1].split(",")
        assert set(queues) <= {names.CONTROL_QUEUE, names.POOL_QUEUE}, queues
        assert rest[rest.index("-P") + 1] == "threads"  # docs/architecture.md, 'Why the threads pool'


def test_the_node_template_runs_the_profile_named_by_its_instance():
    argv = exec_start(DEPLOY / "cipherpool-node@.service")
    assert argv[1:3] == ["pool", "node"]
    assert argv[argv.index("--profile") + 1] == INSTANCE


# -- the environment ------------------------------------------------------------------------------


def test_every_cipherpool_variable_in_the_deploy_files_is_a_setting():
    for path in [ENV_EXAMPLE, *DEPLOY.glob("*.service")]:
        unknown = set(SETTING_PATTERN.findall(path.read_text())) - SETTING_NAMES
        assert not unknown, f"{path.name}: not settings (docs/configuration.md): {sorted(unknown)}"


def test_the_env_example_sets_what_an_operator_must_and_loads_as_settings(monkeypatch):
    assignments = env_example()
    assert set(assignments) >= REQUIRED, REQUIRED - set(assignments)
    # Per instance or per client, never in a file every unit of every host reads.
    assert not {"CIPHERPOOL_NODE_PROFILE", "CIPHERPOOL_API_KEY", "CIPHERPOOL_TOKEN", "CIPHERPOOL_URL"} & set(assignments)
    for key, value in assignments.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # every value parses (a literal store kind, integers, URLs)
    assert settings.effective_blob_store() in {"s3", "fs"}  # a cluster keeps no blob in the broker
    assert settings.metrics_token


def test_the_operations_guide_links_every_deploy_file():
    text = OPERATIONS.read_text()
    for path in DEPLOY.iterdir():
        assert f"deploy/systemd/{path.name}" in text, f"docs/operations.md does not name deploy/systemd/{path.name}"


# -- systemd's own reading ---------------------------------------------------------------------------


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / program).exists() for program in ("cipherpool", "celery")):
        pytest.skip(f"no cipherpool and celery scripts beside {sys.executable} to stand for {VENV_BIN}")
    # verify checks that each ExecStart program exists: point the units at this environment's.
    for path in DEPLOY.iterdir():
        if path.suffix in {".service", ".target"}:
            name = path.name.replace("@.service", f"@{INSTANCE}.service")
            (tmp_path / name).write_text(path.read_text().replace(VENV_BIN, f"{bin_dir}/"))
    units = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "cipherpool" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr
