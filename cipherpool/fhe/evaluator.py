"""Server side of FHE: run a model on a ciphertext with an evaluation key.

:class:`Evaluator` is the seam between the platform and concrete. :class:`ConcreteEvaluator`
loads ``FHEModelServer`` once per node process (loading compiles the circuit: seconds), and
:class:`FakeEvaluator` stands in for fast unit tests of the services around it. Concrete is
imported lazily so that processes which never evaluate (clients, control workers) do not pay
its 2.5-3 s and ~650 MB import.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

from cipherpool.errors import BackendUnavailable, InvalidEvaluationKey, MalformedCiphertext, ModelMismatch
from cipherpool.fhe.deployment import SERVER_ZIP, compiled_backend, read_versions
from cipherpool.fhe.framing import is_complete_message
from cipherpool.fhe.process import after_fhe


def preload() -> float:
    """Import concrete now (seconds taken): a pool node does it at start, so that binding a
    model costs the model's load only (DESIGN.md: the import is 2.5-3 s of a cold start)."""
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
        raise MalformedCiphertext(
            f"The ciphertext ({len(ciphertext)} bytes) is truncated or corrupt; encrypt again."
        )


class ConcreteEvaluator:
    """``gpu_build``: whether this process's concrete has its GPU build and sees a GPU. The
    circuit runs on the backend it was compiled for (:func:`compiled_backend`); one compiled
    for the GPU is refused here without a GPU build, before concrete fails on it."""

    def __init__(self, server_zip: bytes, workdir: Path | None = None, *, gpu_build: bool = False):
        read_versions(server_zip, SERVER_ZIP).require_compatible("This model")
        self.backend = compiled_backend(server_zip)
        if self.backend == "gpu" and not gpu_build:
            raise BackendUnavailable(
                "This model was compiled for the GPU (device=\"cuda\") and this node's concrete has no GPU "
                "build or sees no GPU: install concrete-python's GPU wheel on its gpu nodes, or compile the "
                "model for the CPU.")
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
                    "The ciphertext does not fit this model's input (it was encrypted for "
                    f"another model): {text.splitlines()[0]}"
                ) from None
            if "deserialize" in text.lower():
                raise MalformedCiphertext(f"The ciphertext cannot be read: {text}") from None
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
