"""The registry of execution backends (cipherpool.backends): names, host classes, what a circuit
was compiled for, probes and evaluator factories. No database, no concrete."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from cipherpool import backends
from cipherpool.backends import Backend, cpu, gpu
from cipherpool.errors import BackendUnavailable
from cipherpool.fhe.deployment import compiled_backend
from cipherpool.fhe.evaluator import FakeEvaluator, load_evaluator
from tests.helpers import versions_json, zip_bytes


def test_the_builtins_are_the_cpu_the_fallback_and_the_gpu():
    assert backends.BUILTIN[:2] == (cpu.BACKEND, gpu.BACKEND) and backends.host_classes()[:2] == ("cpu", "gpu")
    assert backends.fallback() is cpu.BACKEND
    assert (backends.DEFAULT_BACKEND, backends.DEFAULT_HOST_CLASS) == ("cpu", "cpu")
    assert re.fullmatch(backends.host_class_pattern(), "gpu") and not re.fullmatch(backends.host_class_pattern(), "gpux")
    assert backends.default_rates("per_hour").items() >= {"cpu": Decimal("1"), "gpu": Decimal("4")}.items()


def test_a_node_probes_the_fallback_and_its_own_class_only():
    assert backends.for_host_class("cpu") == (cpu.BACKEND,)
    assert backends.for_host_class("gpu") == (cpu.BACKEND, gpu.BACKEND)
    assert backends.probe("cpu") == ("cpu",)  # the GPU's probe (which imports concrete) is not asked
    assert backends.runs_on("cpu", "gpu") and not backends.runs_on("gpu", "cpu") and not backends.runs_on("tpu", "cpu")


def test_host_classes_are_spelled_by_the_registry():
    assert backends.host_class("gpu") is gpu.BACKEND.host_class
    with pytest.raises(ValueError, match="Input should be 'cpu', 'gpu'|Input should be 'cpu' or 'gpu'"):
        backends.host_class("GPU")


def test_registration_refuses_clashes():
    before = backends.names()
    with pytest.raises(ValueError, match="registered already"):
        backends.register(Backend(name="gpu", host_class="gpu", target="x", probe=bool, compiled_for=bool))
    with pytest.raises(ValueError, match="fallback already"):
        backends.register(Backend(name="other", host_class="cpu", target="x", probe=bool))
    with pytest.raises(ValueError, match="default rates already"):
        backends.register(
            Backend(name="other", host_class="gpu", target="x", probe=bool, compiled_for=bool, rates=gpu.BACKEND.rates)
        )
    with pytest.raises(ValueError, match="must match"):
        Backend(name="Bad_Name", host_class="cpu", target="x", probe=bool)
    with pytest.raises(ValueError, match="built in"):
        backends.unregister("cpu")
    assert backends.names() == before


def fake_factory(server_zip: bytes, workdir: object) -> FakeEvaluator:
    return FakeEvaluator()


@pytest.fixture
def third():
    """A backend of a host class of its own, registered for one test (what a new module adds)."""
    backend = backends.register(
        Backend(
            name="fpga",
            host_class="fpga",
            target="the FPGA",
            probe=lambda: True,
            compiled_for=lambda configuration: configuration.get("device") == "fpga",
            evaluator="tests.test_backends:fake_factory",
            needs="an FPGA",
            absent="has no FPGA",
            remedy="add one",
            rates=backends.Rates(Decimal("9"), Decimal("1"), Decimal("0.01")),
        )
    )
    yield backend
    backends.unregister(backend.name)
    backends.evaluator_factory.cache_clear()


def server_zip(configuration: dict | None) -> bytes:
    return zip_bytes(
        {
            "versions.json": versions_json(),
            **({"configuration.json": json.dumps(configuration)} if configuration is not None else {}),
        }
    )


def test_a_registered_backend_is_known_everywhere_the_registry_is_asked(third, tmp_path):
    assert "fpga" in backends.host_classes() and backends.default_rates("per_hour")["fpga"] == Decimal("9")
    assert compiled_backend(server_zip({"device": "fpga"})) == "fpga"
    assert compiled_backend(server_zip({"use_gpu": True})) == "gpu"
    assert compiled_backend(server_zip(None)) == "cpu"
    assert backends.probe("fpga") == ("cpu", "fpga")
    assert isinstance(load_evaluator(server_zip({"device": "fpga"}), tmp_path, ("cpu", "fpga")), FakeEvaluator)
    with pytest.raises(BackendUnavailable, match="the FPGA and this node has no FPGA: add one, or compile the model for the CPU"):
        load_evaluator(server_zip({"device": "fpga"}), tmp_path, ("cpu",))
