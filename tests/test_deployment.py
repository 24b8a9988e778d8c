import json

import pytest

from cipherpool.errors import BackendUnavailable, InvalidDeployment, VersionMismatch
from cipherpool.fhe.deployment import Versions, compiled_backend, load_deployment
from cipherpool.fhe.evaluator import load_evaluator
from tests.helpers import make_deployment, versions_json, zip_bytes


def test_a_well_formed_directory_loads(tmp_path):
    dep = load_deployment(make_deployment(tmp_path / "d"))
    assert dep.versions == Versions.installed()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda p: p / "missing", "not a directory"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no client.zip or server.zip"),
        (lambda p: make_deployment(p / "d", server=b"not a zip"), "not a zip"),
        (lambda p: make_deployment(p / "d", client=zip_bytes({"versions.json": versions_json()})), "lacks"),
        (
            lambda p: make_deployment(p / "d", server=zip_bytes({"versions.json": versions_json(python="3.9")})),
            "different versions",
        ),
    ],
)
def test_anything_else_is_an_invalid_deployment(tmp_path, build, match):
    with pytest.raises(InvalidDeployment, match=match):
        load_deployment(build(tmp_path))


def test_other_concrete_versions_are_refused_with_both_versions_named():
    other = Versions(concrete_ml="0.1", concrete_python="0.1", python="3.11")
    with pytest.raises(VersionMismatch, match="0.1"):
        other.require_compatible("This model")


@pytest.mark.parametrize(
    "configuration, backend",
    [
        (None, "cpu"),  # a shared library saved without MLIR runs where it was built
        (json.dumps({"use_gpu": False, "p_error": None}), "cpu"),
        (json.dumps({"use_gpu": True}), "gpu"),
        (json.dumps({"use_gpu": "yes"}), "cpu"),  # only a real true asks for the GPU
        (json.dumps([1, 2]), "cpu"),
    ],
)
def test_the_backend_a_circuit_was_compiled_for_is_read_from_its_configuration(configuration, backend):
    files = {"versions.json": versions_json(), **({"configuration.json": configuration} if configuration else {})}
    assert compiled_backend(zip_bytes(files)) == backend


@pytest.mark.parametrize(
    "data",
    [
        b"not a zip",
        zip_bytes({"configuration.json": "{not json"}),
        zip_bytes({"configuration.json": json.dumps({"use_gpu": True, "pad": "x" * (1024 * 1024)})}),  # above the cap
    ],
)
def test_an_unreadable_configuration_is_an_invalid_deployment(data):
    with pytest.raises(InvalidDeployment, match="server.zip has an unreadable configuration.json"):
        compiled_backend(data)


def test_a_circuit_compiled_for_the_gpu_is_refused_without_the_gpu_build(tmp_path):
    server = zip_bytes({"versions.json": versions_json(), "configuration.json": json.dumps({"use_gpu": True})})
    with pytest.raises(BackendUnavailable, match="compiled for the GPU"):
        load_evaluator(server, tmp_path, capabilities=("cpu",))  # a node without concrete's GPU build
    assert not any(tmp_path.iterdir())  # refused before anything was written
