import pytest

from cipherpool.errors import InvalidDeployment, VersionMismatch
from cipherpool.fhe.deployment import Versions, load_deployment
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
        (lambda p: make_deployment(p / "d", server=zip_bytes({"versions.json": versions_json(python="3.9")})),
         "different versions"),
    ],
)
def test_anything_else_is_an_invalid_deployment(tmp_path, build, match):
    with pytest.raises(InvalidDeployment, match=match):
        load_deployment(build(tmp_path))


def test_other_concrete_versions_are_refused_with_both_versions_named():
    other = Versions(concrete_ml="0.1", concrete_python="0.1", python="3.11")
    with pytest.raises(VersionMismatch, match="0.1"):
        other.require_compatible("This model")
