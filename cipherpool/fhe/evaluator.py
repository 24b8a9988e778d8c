"""Server side of FHE: run a model on a ciphertext with an evaluation key.

:class:`Evaluator` is the seam between the platform and concrete. :class:`ConcreteEvaluator`
loads ``FHEModelServer`` once per node process (loading compiles the circuit: seconds), and
:class:`FakeEvaluator` stands in for fast unit tests of the services around it. Concrete is
imported lazily so that processes which never evaluate (clients, control workers) do not pay
its 2.5-3 s and ~650 MB import.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol, cast

from cipherpool import backends
from cipherpool.errors import BackendUnavailable, InvalidCiphertext, InvalidEvaluationKey, MalformedCiphertext, ModelMismatch
from cipherpool.fhe.deployment import SERVER_ZIP, compiled_backend, read_versions
from cipherpool.fhe.framing import is_complete_message
from cipherpool.fhe.process import after_fhe

# How concrete's transport-value verifier begins every refusal of an input (see
# cipherpool.fhe.values): the caller's ciphertext, never the platform's failure.
VERIFIER_REFUSAL = "Tried to transform"


def preload() -> float:
    """Import concrete now (seconds taken): a pool node does it at start, so that binding a
    model costs the model's load only (docs/architecture.md, 'Importing concrete once': the import is 2.5-3 s of a cold start)."""
    import time

    started = time.monotonic()
    import concrete.fhe  # noqa: F401
    import concrete.ml.deployment  # noqa: F401

    return time.monotonic() - started


class Evaluator(Protocol):
    def load_keys(self, serialized: bytes) -> Any: ...

    def run(self, ciphertext: bytes, keys: Any) -> bytes: ...


def check_ciphertext_framing(ciphertext: bytes) -> None:
    if not is_complete_message(ciphertext):
        raise MalformedCiphertext(f"The ciphertext ({len(ciphertext)} bytes) is truncated or corrupt; encrypt again.")


def load_evaluator(server_zip: bytes, workdir: Path, capabilities: Collection[str]) -> Evaluator:
    """The evaluator of ``server_zip``, made by the backend it was compiled for
    (:func:`compiled_backend`). A node whose ``capabilities`` lack that backend refuses it
    before anything is written or compiled: concrete would otherwise fail on it, or compile it
    for another target whose crypto parameters the client's keys need not fit."""
    backend = backends.get(compiled_backend(server_zip))
    if backend.name not in capabilities:
        raise BackendUnavailable(
            f"This model was compiled for {backend.target} and this node {backend.absent or 'cannot run it'}: "
            f"{backend.remedy or 'run it on a node that can'}, or compile the model for {backends.fallback().target}."
        )
    return cast(Evaluator, backends.evaluator_factory(backend.name)(server_zip, workdir))


def evaluator_factory(host_class: str) -> Callable[[bytes, Path], Evaluator]:
    """How a pool node of ``host_class`` loads a model version: by its backend, where this
    node's probes say it can run it (a costly probe, such as the GPU's, caches its answer)."""

    def load(server_zip: bytes, workdir: Path) -> Evaluator:
        return load_evaluator(server_zip, workdir, backends.probe(host_class))

    return load


class ConcreteEvaluator:
    """concrete-ml's server; the circuit is compiled at load for the target its configuration
    names (reached through :func:`load_evaluator`, which checks this node can run it)."""

    def __init__(self, server_zip: bytes, workdir: Path | None = None):
        read_versions(server_zip, SERVER_ZIP).require_compatible("This model")
        from concrete.ml.deployment import FHEModelServer

        self._dir = Path(workdir or tempfile.mkdtemp(prefix="cipherpool-model-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / SERVER_ZIP).write_bytes(server_zip)
        try:
            self._server = FHEModelServer(str(self._dir))
        finally:
            after_fhe()  # concrete's runtime must not take SIGPIPE or the exit status (fhe/process.py)

    def load_keys(self, serialized: bytes) -> Any:
        from concrete import fhe

        if not is_complete_message(serialized):
            # Never hand a truncated key to concrete: its reader loops forever on one.
            raise InvalidEvaluationKey("The evaluation key is truncated or corrupt; upload it again.")
        try:
            return fhe.EvaluationKeys.deserialize(serialized)
        except RuntimeError as exc:
            raise InvalidEvaluationKey(f"The evaluation key cannot be read: {exc}") from None

    def run(self, ciphertext: bytes, keys: Any) -> bytes:
        check_ciphertext_framing(ciphertext)
        try:
            output: bytes = self._server.run(ciphertext, keys)
            return output
        except RuntimeError as exc:
            text = str(exc)
            if "incompatible raw info" in text:
                raise ModelMismatch(
                    f"The ciphertext does not fit this model's input (it was encrypted for another model): {text.splitlines()[0]}"
                ) from None
            if "deserialize" in text.lower():
                raise MalformedCiphertext(f"The ciphertext cannot be read: {text}") from None
            if text.startswith(VERIFIER_REFUSAL):
                raise InvalidCiphertext(f"The ciphertext cannot be evaluated: {text.splitlines()[0]}") from None
            raise
        finally:
            after_fhe()  # the first run starts concrete's runtime, which takes SIGPIPE (fhe/process.py)


class FakeEvaluator:
    """Echoes the ciphertext with the key's first bytes appended; for unit tests only."""

    def __init__(self) -> None:
        self.runs = 0
        self.key_loads = 0

    def load_keys(self, serialized: bytes) -> bytes:
        self.key_loads += 1
        return serialized

    def run(self, ciphertext: bytes, keys: bytes) -> bytes:
        check_ciphertext_framing(ciphertext)
        self.runs += 1
        return ciphertext + keys[:8]
