"""Client side of FHE: keys, encryption and decryption on the end user's machine.

The secret key is generated here and stays in ``key_dir`` (concrete's key-set cache, kept
0700 with 0600 files), so a later process, e.g. the next CLI step, finds the same keys; only
the serialized *evaluation* key is ever handed to the platform.

concrete (torch with it: seconds to import, most of a CLI step's time) is imported when keys
are made, loaded or used, not when the specs are written: a step that only names its key set
(``cipherpool query execute``, ``query keys delete``) reads the id from ``key_dir`` and never loads it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cipherpool.errors import InvalidShape, MalformedCiphertext
from cipherpool.fhe.deployment import CLIENT_ZIP, input_spec, read_versions
from cipherpool.files import private_dir, tighten_tree, write_private

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

KEY_ID_FILE = "key_id"


class ClientCrypto:
    def __init__(self, client_zip: bytes, key_dir: Path):
        read_versions(client_zip, CLIENT_ZIP).require_compatible("This model's client specs")
        self.key_dir = Path(key_dir)
        self._spec_dir = private_dir(self.key_dir / "spec")
        private_dir(self.key_dir)
        write_private(self._spec_dir / CLIENT_ZIP, client_zip)
        self._fhe: Any = None  # concrete-ml's FHEModelClient, made on first use (self._client)
        self._keys_loaded = False
        self.input_shape = input_spec(client_zip).shape  # with the batch axis, e.g. [1, 1, 66, 66]

    @property
    def _client(self) -> Any:
        """concrete-ml's client for these specs: imported and made when first needed."""
        if self._fhe is None:
            from concrete.ml.deployment import FHEModelClient

            self._fhe = FHEModelClient(str(self._spec_dir), key_dir=str(self.key_dir / "keyset"))
        return self._fhe

    def _load_keys(self) -> None:
        """Load the key set from key_dir (or make one) before it is used."""
        if not self._keys_loaded:
            self.generate_keys()

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
        self._load_keys()
        key: bytes = self._client.get_serialized_evaluation_keys()
        return key

    def secret_key_material(self) -> list[bytes]:
        """The serialized LWE secret keys of this key set: what must never leave this machine.
        Only for checks that nothing sent holds them (the demo's ``--explain``)."""
        self._load_keys()
        try:  # concrete keeps them behind private attributes (concrete-python 2.10): read, never relied on
            keyset = self._client.client.keys._keyset
            return [key.serialize() for key in keyset.get_client_keys().get_secret_keys()]
        except (AttributeError, TypeError):  # another concrete: no samples, and the report says so
            return []

    def key_id(self) -> str:
        """This key set's id, as `query keygen` (another process, maybe) left it in key_dir; where
        there is none yet, the key set is made (or loaded) first. Reading it loads no concrete."""
        path = self.key_dir / KEY_ID_FILE
        if not self._keys_loaded and not path.exists():
            return self.generate_keys()
        return path.read_text().strip()

    def encrypt(self, x: ArrayLike) -> bytes:
        import numpy as np

        self._load_keys()
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
        self._load_keys()
        try:
            result: NDArray[Any] = self._client.deserialize_decrypt_dequantize(ciphertext)
            return result
        except RuntimeError as exc:
            raise MalformedCiphertext(f"The result cannot be decrypted: {exc}") from None
