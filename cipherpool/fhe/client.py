"""Client side of FHE: keys, encryption and decryption on the end user's machine.

The secret key is generated here and stays in ``key_dir`` (concrete's key-set cache, kept
0700 with 0600 files), so a later process, e.g. the next CLI step, finds the same keys; only
the serialized *evaluation* key is ever handed to the platform.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cipherpool.errors import InvalidShape, MalformedCiphertext
from cipherpool.fhe.deployment import CLIENT_ZIP, input_spec, read_versions
from cipherpool.files import private_dir, tighten_tree, write_private

KEY_ID_FILE = "key_id"


class ClientCrypto:
    def __init__(self, client_zip: bytes, key_dir: Path):
        read_versions(client_zip, CLIENT_ZIP).require_compatible("This model's client specs")
        from concrete.ml.deployment import FHEModelClient

        self.key_dir = Path(key_dir)
        spec_dir = private_dir(self.key_dir / "spec")
        private_dir(self.key_dir)
        write_private(spec_dir / CLIENT_ZIP, client_zip)
        self._client = FHEModelClient(str(spec_dir), key_dir=str(self.key_dir / "keyset"))
        self._keys_loaded = False
        self.input_shape = input_spec(client_zip).shape  # with the batch axis, e.g. [1, 1, 66, 66]

    def generate_keys(self, force: bool = False) -> str:
        """Create (or load from key_dir) the key set; returns its id.

        The id is random, minted with the key set: it names this client's keys on the
        platform and in every ciphertext, which the evaluation key's hash cannot do (models
        without bootstrapping give every client the same evaluation key bytes)."""
        self._client.generate_private_and_evaluation_keys(force=force)
        self._keys_loaded = True
        path = self.key_dir / KEY_ID_FILE
        if force or not path.exists():
            write_private(path, uuid.uuid4().hex)
        tighten_tree(self.key_dir)  # concrete writes the secret key with the process umask
        return path.read_text().strip()

    def evaluation_key(self) -> bytes:
        key: bytes = self._client.get_serialized_evaluation_keys()
        return key

    def secret_key_material(self) -> list[bytes]:
        """The serialized LWE secret keys of this key set: what must never leave this machine.
        Only for checks that nothing sent holds them (the demo's ``--explain``)."""
        self.key_id()  # loads or makes the key set
        try:  # concrete keeps them behind private attributes (concrete-python 2.10): read, never relied on
            keyset = self._client.client.keys._keyset
            return [key.serialize() for key in keyset.get_client_keys().get_secret_keys()]
        except (AttributeError, TypeError):  # another concrete: no samples, and the report says so
            return []

    def key_id(self) -> str:
        """This key set's id; loads the key set from key_dir (or makes one) on first use, so
        that each CLI step, a process of its own, works with the keys of `query keygen`."""
        if not self._keys_loaded:
            return self.generate_keys()
        return (self.key_dir / KEY_ID_FILE).read_text().strip()

    def encrypt(self, x: ArrayLike) -> bytes:
        sample = np.asarray(x)
        if self.input_shape and sample.ndim == len(self.input_shape) - 1:
            sample = sample[np.newaxis]  # one sample of an image model, say (1, 66, 66): add the batch axis
        elif sample.ndim == 1:
            sample = sample.reshape(1, -1)
        try:
            ciphertext: bytes = self._client.quantize_encrypt_serialize(sample)
            return ciphertext
        except (ValueError, AssertionError) as exc:
            raise InvalidShape(
                f"Input of shape {np.asarray(x).shape} does not fit this model: {exc}. "
                "encrypt() takes one sample: a 1-D array of the model's features, or one image "
                "without the batch axis."
            ) from None

    def decrypt(self, ciphertext: bytes) -> NDArray[Any]:
        try:
            result: NDArray[Any] = self._client.deserialize_decrypt_dequantize(ciphertext)
            return result
        except RuntimeError as exc:
            raise MalformedCiphertext(f"The result cannot be decrypted: {exc}") from None
