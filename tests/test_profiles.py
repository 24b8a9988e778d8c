"""Node profiles (the TOML file, resolution, the node's command line), host capacity
detection with injected paths, and `cipherpool pool` through click's CliRunner. No Redis,
no celery, no concrete."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cipherpool.backends import cpu as cpu_backend
from cipherpool.backends import gpu as gpu_backend
from cipherpool.cli import pool as pool_cli
from cipherpool.cli.context import CipherpoolGroup, CliContext
from cipherpool.config.profiles import (
    NodeProfile,
    labels_match,
    load_profiles,
    matches,
    node_command,
    node_environment,
    parse_size,
    resolve_profile,
    shell_line,
)
from cipherpool.config.settings import GIB, Settings
from cipherpool.errors import ConfigurationError
from cipherpool.names import POOL_QUEUE
from cipherpool.workers import capacity


class HostClass:
    """The built-in backends' host classes, as the registry spells them (a profile holds these very objects)."""

    CPU = cpu_backend.BACKEND.host_class
    GPU = gpu_backend.BACKEND.host_class


TWO_PROFILES = """\
[profiles.cpu-small]
host_class = "cpu"
concurrency = 2
key_cache = "512MiB"
labels = { zone = "a", disk = "ssd" }

[profiles.gpu-a]
host_class = "gpu"
threads = 8
key_cache_bytes = 1000
labels = { zone = "b", "gpu.model" = "h100" }
shared = true
model_cache = "1.5GB"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("10B", 10),
        ("1KiB", 1024),
        ("1KB", 1000),
        ("512MiB", 512 * 1024**2),
        ("4GiB", 4 * GIB),
        ("4 GiB", 4 * GIB),
        (" 2gib ", 2 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("3MB", 3_000_000),
        ("2GB", 2_000_000_000),
        ("1TiB", 1024**4),
        ("1TB", 10**12),
    ],
)
def test_sizes_parse(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is not a size"),
        ("GiB", "is not a size"),
        ("-1GiB", "is not a size"),
        ("4 G i B", "is not a size"),
        ("4XB", "unknown unit 'XB'"),
        ("4G", "unknown unit 'G'"),
        (-1, "must not be negative"),
        (1.5, "is not a size"),
        (True, "is not a size"),
        (None, "is not a size"),
    ],
)
def test_bad_sizes_say_what_a_size_looks_like(value, message):
    with pytest.raises(ValueError, match=message):
        parse_size(value)


# --- the profile model -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threads", "concurrency", "cores", "expected"),
    [
        (None, 1, 8, 8),
        (None, 2, 8, 4),
        (None, 3, 8, 2),
        (None, 4, 2, 1),  # never below one
        (3, 2, 8, 3),  # the profile's own count wins
    ],
)
def test_effective_threads_share_the_cores(threads, concurrency, cores, expected):
    profile = NodeProfile(name="p", threads=threads, concurrency=concurrency)
    assert profile.effective_threads(cores) == expected


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ({}, True),
        ({"zone": "a"}, True),
        ({"zone": "a", "disk": "ssd"}, True),
        ({"zone": "b"}, False),
        ({"gpu": "h100"}, False),
        ({"zone": "a", "disk": "hdd"}, False),
    ],
)
def test_a_selector_matches_when_all_its_labels_are_present(selector, selected):
    labels = {"zone": "a", "disk": "ssd"}
    assert labels_match(labels, selector) is selected
    assert matches(labels, selector) is selected
    assert NodeProfile(name="p", labels=labels).selects(selector) is selected


def test_a_profile_has_defaults_and_is_frozen():
    profile = NodeProfile(name="p")
    assert (profile.host_class, profile.concurrency, profile.threads, profile.shared) == (HostClass.CPU, 1, None, False)
    assert (profile.key_cache_bytes, profile.model_cache_bytes, profile.labels) == (4 * GIB, 2 * GIB, {})
    with pytest.raises(ValueError):
        profile.concurrency = 2  # type: ignore[misc]


# --- the file --------------------------------------------------------------------------------


def test_a_file_with_two_profiles_loads(tmp_path):
    profiles = load_profiles(write(tmp_path, TWO_PROFILES))
    assert list(profiles) == ["cpu-small", "gpu-a"]
    cpu, gpu = profiles["cpu-small"], profiles["gpu-a"]
    assert (cpu.name, cpu.host_class, cpu.concurrency, cpu.threads) == ("cpu-small", HostClass.CPU, 2, None)
    assert (cpu.key_cache_bytes, cpu.labels, cpu.shared) == (512 * 1024**2, {"zone": "a", "disk": "ssd"}, False)
    assert (gpu.host_class, gpu.threads, gpu.key_cache_bytes, gpu.shared) == (HostClass.GPU, 8, 1000, True)
    assert gpu.model_cache_bytes == 1_500_000_000
    assert gpu.selects({"gpu.model": "h100"}) and not cpu.selects({"zone": "b"})


def test_a_missing_file_says_where_it_looked_and_shows_an_example(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigurationError) as info:
        load_profiles(path)
    assert str(path) in info.value.message and "CIPHERPOOL_PROFILES_FILE" in info.value.message
    assert "[profiles.cpu-small]" in info.value.message


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = write(tmp_path, "[profiles.a]\nconcurrency = 1\nthreads = = 2\n")
    with pytest.raises(ConfigurationError, match=r"not valid TOML.*line 3"):
        load_profiles(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[profiles.gpu-a]\nthredas = 2\n", "profile 'gpu-a': thredas: Extra inputs are not permitted"),
        ('[profiles.gpu-a]\nhost_class = "tpu"\n', "profile 'gpu-a': host_class: Input should be 'cpu' or 'gpu'"),
        ("[profiles.gpu-a]\nthreads = 0\n", "profile 'gpu-a': threads: Input should be greater than or equal to 1"),
        ("[profiles.gpu-a]\nconcurrency = 65\n", "concurrency: Input should be less than or equal to 64"),
        ('[profiles.gpu-a]\nkey_cache = "4XB"\n', "profile 'gpu-a': key_cache: '4XB': unknown unit"),
        ("[profiles.gpu-a]\nkey_cache = 0\n", "key_cache: Input should be greater than 0"),
        ('[profiles.gpu-a]\nlabels = { zone = "a b" }\n', "labels: zone='a b': keys and values must match"),
        ('[profiles.gpu-a]\nlabels = { "nvidia.com/gpu" = "x" }\n', "labels: nvidia.com/gpu='x': keys and values must"),
        ('[profiles.gpu-a]\nlabels = { zone = "" }\n', "labels: zone='': keys and values must match"),
        ("[profiles.gpu-a]\nlabels = { zone = 1 }\n", "labels.zone: Input should be a valid string"),
        ("[profiles.GPU]\n", "profile 'GPU': name: String should match pattern"),
        ('[profiles.gpu-a]\nname = "other"\n', "profile 'gpu-a': name: remove it"),
        ("profiles = { gpu-a = 3 }\n", "profile 'gpu-a': must be a table"),
        ("[profile.gpu-a]\n", "unknown top-level key(s) profile"),
        ('title = "x"\n', "unknown top-level key(s) title"),
        ("", "defines no profiles"),
        ("[profiles]\n", "defines no profiles"),
    ],
)
def test_an_invalid_file_names_the_profile_and_the_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load_profiles(path)
    assert message in info.value.message
    assert str(path) in info.value.message


# --- resolution from settings ----------------------------------------------------------------


def test_a_named_profile_comes_from_the_file(tmp_path):
    path = write(tmp_path, TWO_PROFILES)
    profile = resolve_profile(Settings(data_dir=tmp_path / "data", node_profile="gpu-a", profiles_file=path))
    assert profile.name == "gpu-a" and profile.host_class is HostClass.GPU


def test_the_default_file_is_in_the_data_directory(tmp_path):
    write(tmp_path, TWO_PROFILES)
    assert resolve_profile(Settings(data_dir=tmp_path, node_profile="cpu-small")).concurrency == 2


def test_an_unknown_profile_lists_the_known_ones(tmp_path):
    path = write(tmp_path, TWO_PROFILES)
    with pytest.raises(ConfigurationError, match=r"No profile 'gpu-b' in .*known: cpu-small, gpu-a"):
        resolve_profile(Settings(data_dir=tmp_path, node_profile="gpu-b", profiles_file=path))


def test_without_a_profile_name_the_settings_make_the_default_profile(tmp_path):
    settings = Settings(data_dir=tmp_path, host_class="GPU", node_threads=3, key_cache_bytes=GIB)
    profile = resolve_profile(settings)
    assert profile == NodeProfile(name="default", host_class=HostClass.GPU, threads=3, key_cache_bytes=GIB)
    assert (profile.concurrency, profile.labels, profile.shared) == (1, {}, False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host_class": "tpu"}, "CIPHERPOOL_HOST_CLASS='tpu' is not a host class; use cpu, gpu"),
        ({"node_threads": 0}, "threads: Input should be greater than or equal to 1"),
        ({"key_cache_bytes": 0}, "key_cache_bytes: Input should be greater than 0"),
    ],
)
def test_bad_plain_settings_are_configuration_errors(tmp_path, fields, message):
    with pytest.raises(ConfigurationError) as info:
        resolve_profile(Settings(data_dir=tmp_path, **fields))
    assert message in info.value.message


# --- the node's command line ------------------------------------------------------------------


def test_the_node_command_is_the_plain_celery_line():
    profile = NodeProfile(name="cpu-small", concurrency=3)
    argv = node_command(profile, "cpu-small@%h", python="/py", loglevel="debug")
    assert argv == [
        "/py",
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
        "3",
        "-n",
        "cpu-small@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "debug",
    ]
    assert node_command(profile, "n@h")[0] == sys.executable


def test_the_node_environment_names_the_profile_and_the_file_when_given(tmp_path):
    profile = NodeProfile(name="cpu-small")
    assert node_environment(profile, None) == {"CIPHERPOOL_NODE_PROFILE": "cpu-small"}
    assert node_environment(profile, tmp_path / "p.toml") == {
        "CIPHERPOOL_NODE_PROFILE": "cpu-small",
        "CIPHERPOOL_PROFILES_FILE": str(tmp_path / "p.toml"),
    }


def test_the_shell_line_is_what_a_user_types():
    argv = node_command(NodeProfile(name="cpu-small"), "cpu-small@%h")
    line = shell_line(argv, {"CIPHERPOOL_NODE_PROFILE": "cpu-small"})
    assert line == (
        f"CIPHERPOOL_NODE_PROFILE=cpu-small celery -A cipherpool.tasks worker -Q {POOL_QUEUE} "
        "-P threads -c 1 -n cpu-small@%h --without-gossip --without-mingle --loglevel info"
    )


def test_the_shell_line_quotes_values_not_assignments():
    line = shell_line(["/bin/echo", "a b"], {"CIPHERPOOL_PROFILES_FILE": "/my dir/p.toml"})
    assert line == "CIPHERPOOL_PROFILES_FILE='/my dir/p.toml' /bin/echo 'a b'"
    assert shlex.split(line) == ["CIPHERPOOL_PROFILES_FILE=/my dir/p.toml", "/bin/echo", "a b"]


# --- host capacity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "physical", "expected"),
    [
        ("1073741824\n", 8 * GIB, GIB),  # the container's limit is below the machine's memory
        (str(16 * GIB), 8 * GIB, 8 * GIB),  # a limit above the machine's memory means nothing
        ("max\n", 8 * GIB, 8 * GIB),  # no limit
        ("garbage", 8 * GIB, 8 * GIB),
        (None, 8 * GIB, 8 * GIB),  # no cgroup v2
        ("1073741824", 0, GIB),  # the OS does not say how much memory it has
    ],
)
def test_memory_is_the_smaller_of_the_cgroup_limit_and_physical_memory(tmp_path, cgroup, physical, expected):
    path = tmp_path / "memory.max"
    if cgroup is not None:
        path.write_text(cgroup)
    assert capacity.memory_bytes(path, physical=physical) == expected


def test_memory_probes_physical_memory_by_default(tmp_path):
    assert capacity.memory_bytes(tmp_path / "absent") == capacity.physical_memory_bytes() > 0


def test_physical_memory_never_raises(monkeypatch):
    def refuse(_name: str) -> int:
        raise ValueError("unknown configuration name")

    monkeypatch.setattr(os, "sysconf", refuse)
    assert capacity.physical_memory_bytes() == 0


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("0", 1),
        ("0,1", 2),
        ("GPU-8a1b,GPU-9c2d", 2),
        (" 0 , 1 , 2 ", 3),
        ("", 0),
        ("-1", 0),
        ("0,-1,1", 1),  # CUDA stops at the first invalid entry
    ],
)
def test_cuda_visible_devices_decides_the_gpus(tmp_path, monkeypatch, visible, expected):
    (tmp_path / "nvidia0").touch()  # ignored: the variable wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert capacity.gpu_count(dev_dir=tmp_path) == expected
    assert capacity.gpu_count(dev_dir=tmp_path, environ={"CUDA_VISIBLE_DEVICES": visible}) == expected


def test_without_the_variable_gpus_are_the_nvidia_device_files(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset", "null"):
        (tmp_path / name).touch()
    assert capacity.gpu_count(dev_dir=tmp_path) == 2
    assert capacity.gpu_count(dev_dir=tmp_path / "absent") == 0


def test_detect_puts_the_probes_together(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    (tmp_path / "memory.max").write_text("12345")
    found = capacity.detect(cgroup_memory_max=tmp_path / "memory.max", dev_dir=tmp_path)
    expected_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert found == capacity.Capacity(cores=expected_cores, memory_bytes=12345, gpus=3)


def test_cores_fall_back_to_the_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert capacity.cpu_cores() == 1


def test_no_concrete_gpu_is_false_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "concrete.compiler", None)  # importing it now fails
    capacity.concrete_gpu_available.cache_clear()
    try:
        assert capacity.concrete_gpu_available() is False
    finally:
        capacity.concrete_gpu_available.cache_clear()


# --- `cipherpool pool` -------------------------------------------------------------------------


@pytest.fixture
def cli_ctx(tmp_path) -> CliContext:
    write(tmp_path, TWO_PROFILES)  # the default file: <data dir>/profiles.toml
    return CliContext(Settings(data_dir=tmp_path))


def invoke(ctx: CliContext, args: list[str]):
    """As the root group will: CipherpoolGroup turns a CipherpoolError into a line and a code."""
    root = CipherpoolGroup("cipherpool", commands={"pool": pool_cli.pool})
    return CliRunner().invoke(root, ["pool", *args], obj=ctx)


def test_pool_node_print_shows_the_shell_line(cli_ctx):
    result = invoke(cli_ctx, ["node", "--profile", "cpu-small", "--print"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"CIPHERPOOL_NODE_PROFILE=cpu-small celery -A cipherpool.tasks worker -Q {POOL_QUEUE} "
        "-P threads -c 2 -n cpu-small@%h --without-gossip --without-mingle --loglevel info\n"
    )


def test_pool_node_print_names_a_given_file_and_node(cli_ctx, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    path = write(other, TWO_PROFILES.replace("concurrency = 2", "concurrency = 5"))
    result = invoke(
        cli_ctx, ["node", "--profile", "cpu-small", "--profiles", str(path), "--name", "n1@box", "--loglevel", "DEBUG", "--print"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"CIPHERPOOL_NODE_PROFILE=cpu-small CIPHERPOOL_PROFILES_FILE={path} celery ")
    assert "-c 5 -n n1@box --without-gossip --without-mingle --loglevel debug" in result.output


def test_pool_node_execs_celery_with_the_profile_in_its_environment(cli_ctx, monkeypatch):
    calls = []
    monkeypatch.setattr(pool_cli, "_exec", lambda argv, env: calls.append((argv, env)))
    monkeypatch.setenv("SOMETHING_OF_THE_SHELL", "kept")
    cli_ctx.settings = cli_ctx.settings.model_copy(update={"broker_url": "redis://h:1/0", "api_key": "cpk_x"})
    result = invoke(cli_ctx, ["node", "--profile", "gpu-a"])
    assert result.exit_code == 0, result.output
    [(argv, env)] = calls
    assert argv == node_command(NodeProfile(name="gpu-a", host_class="gpu"), "gpu-a@%h")
    assert env["CIPHERPOOL_NODE_PROFILE"] == "gpu-a" and "CIPHERPOOL_PROFILES_FILE" not in env
    assert env["SOMETHING_OF_THE_SHELL"] == "kept"
    assert env["CIPHERPOOL_BROKER_URL"] == "redis://h:1/0"  # a global --broker-url reaches the node
    assert env["CIPHERPOOL_DATA_DIR"] == str(cli_ctx.settings.data_dir)
    assert "CIPHERPOOL_API_KEY" not in env  # a node has no use for the client's credentials


def test_pool_node_takes_the_profile_from_the_environment(cli_ctx, monkeypatch):
    monkeypatch.setenv("CIPHERPOOL_NODE_PROFILE", "gpu-a")
    result = invoke(cli_ctx, ["node", "--print"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("CIPHERPOOL_NODE_PROFILE=gpu-a celery ")


def test_pool_node_without_a_profile_is_a_usage_error(cli_ctx):
    result = invoke(cli_ctx, ["node", "--print"])
    assert result.exit_code == 2 and "--profile NAME" in result.output


def test_pool_node_with_an_unknown_profile_lists_the_known_ones(cli_ctx):
    result = invoke(cli_ctx, ["node", "--profile", "nope", "--print"])
    assert result.exit_code == ConfigurationError.exit_code
    assert "error [configuration_error]: No profile 'nope'" in result.output and "cpu-small, gpu-a" in result.output


def test_pool_profiles_lists_them_as_a_table(cli_ctx):
    result = invoke(cli_ctx, ["profiles"])
    assert result.exit_code == 0, result.output
    header, cpu, gpu = result.output.splitlines()
    assert header.split() == ["NAME", "HOST_CLASS", "CONCURRENCY", "THREADS", "KEY_CACHE_BYTES", "LABELS", "SHARED"]
    assert cpu.split() == ["cpu-small", "cpu", "2", "-", str(512 * 1024**2), "zone=a,disk=ssd", "False"]
    assert gpu.split() == ["gpu-a", "gpu", "1", "8", "1000", "zone=b,gpu.model=h100", "True"]


def test_pool_profiles_as_json(cli_ctx, tmp_path):
    cli_ctx.as_json = True
    other = tmp_path / "elsewhere.toml"
    other.write_text('[profiles.solo]\nkey_cache = "1GiB"\n')
    result = invoke(cli_ctx, ["profiles", "--profiles", str(other)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {
            "name": "solo",
            "host_class": "cpu",
            "concurrency": 1,
            "threads": None,
            "key_cache_bytes": GIB,
            "labels": None,
            "shared": False,
            "model_cache_bytes": 2 * GIB,
        }
    ]


def test_pool_profiles_without_a_file_says_how_to_make_one(tmp_path):
    result = invoke(CliContext(Settings(data_dir=tmp_path / "empty")), ["profiles"])
    assert result.exit_code == ConfigurationError.exit_code
    assert "No profiles file at" in result.output and "[profiles.cpu-small]" in result.output
