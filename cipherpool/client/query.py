"""QueryClient: what an end user runs on their own machine.

Keys are generated here and the secret key never leaves ``key_dir``; the platform sees the
evaluation key (uploaded once, by content hash) and ciphertexts. ``predict`` is
``decrypt(execute(encrypt(x)))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from celery.result import AsyncResult

from cipherpool.client.transport import Transport, client_settings
from cipherpool.config.settings import Settings
from cipherpool.credentials import digest
from cipherpool.errors import ConfigurationError, KeyMismatch, ModelMismatch, ModelUnavailable, QueryTimeout
from cipherpool.fhe.client import ClientCrypto
from cipherpool.messages import EncryptedInput, EncryptedOutput, QueryReply, QueryRequest
from cipherpool.names import TASK_PREFIX, model_queue
from cipherpool.store import BlobKind

QUERY_TASK = TASK_PREFIX + "query.run"
CLIENT_TASK = TASK_PREFIX + "client."


@dataclass
class QueryHandle:
    """A submitted query; ``result()`` waits for the encrypted output."""

    client: QueryClient
    async_result: AsyncResult
    submitted_at: float
    reply: QueryReply | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _output: bytes | None = None

    @property
    def id(self) -> str:
        return self.async_result.id

    def result(self, timeout: float | None = None) -> bytes:
        """The encrypted output (an EncryptedOutput envelope); waits at most timeout seconds."""
        if self._output is not None:
            return self._output
        timeout = timeout or self.client.settings.query_timeout_s
        try:
            value = self.client._t.wait(self.async_result, timeout, "the query")
        except QueryTimeout:
            self.async_result.revoke()  # do not compute an answer nobody waits for
            self.client._explain_timeout()
            raise
        self.reply = QueryReply.decode(value)
        output = self.reply.output
        if output is None:  # a large result by reference: this client is its only reader
            output = self.client._t.store.get_payload(self.reply.output_ref or "")
            self.client._t.store.delete_payload(self.reply.output_ref or "")
        self.timings = {**self.reply.timings, "end_to_end_s": time.time() - self.submitted_at}
        self._output = output
        return output


class QueryClient:
    def __init__(self, token: str | None = None, broker_url: str | None = None, *,
                 key_dir: str | Path | None = None, settings: Settings | None = None):
        self.settings = client_settings(broker_url, settings)
        self.token = token or self.settings.token
        if not self.token:
            raise ConfigurationError("No access token: pass token= or set CIPHERPOOL_TOKEN.")
        self.key_dir = Path(key_dir) if key_dir else self.settings.data_dir / "client" / digest(self.token)[:16]
        self._t = Transport(self.settings)
        self._model: dict[str, Any] | None = None
        self._crypto: ClientCrypto | None = None
        self.last_timings: dict[str, float] = {}

    @property
    def model(self) -> dict[str, Any]:
        """The model this token queries (id, name, status, versions); fetched once."""
        if self._model is None:
            self._model = self._t.call(CLIENT_TASK + "describe", token=self.token)
        return self._model

    @property
    def crypto(self) -> ClientCrypto:
        if self._crypto is None:
            client_zip = self._t.store.get(BlobKind.CLIENT_ZIP, self.model["client_blob"])
            self._crypto = ClientCrypto(client_zip, self.key_dir / self.model["id"])
        return self._crypto

    def generate_keys(self, force: bool = False) -> str:
        """Create (or reload) this client's keys; returns the evaluation key id."""
        return self.crypto.generate_keys(force=force)

    def upload_evaluation_keys(self) -> str:
        """Put the evaluation key in the store (content-addressed: an identical key is stored
        once) and register it under this key set's id, which it returns."""
        key_id = self.crypto.key_id()
        blob_id = self._t.store.put(BlobKind.EVALUATION_KEY, self.crypto.evaluation_key())
        self._t.call(CLIENT_TASK + "register_key", token=self.token, key_id=key_id, blob_id=blob_id)
        return key_id

    def encrypt(self, x: Any) -> bytes:
        return EncryptedInput(self.model["id"], self.crypto.key_id(), self.crypto.encrypt(x)).encode()

    def submit(self, ciphertext: bytes) -> QueryHandle:
        EncryptedInput.decode(ciphertext)  # refuse garbage here, before it costs a round trip
        inline = len(ciphertext) <= self.settings.inline_max_bytes
        request = QueryRequest(
            token=self.token,
            model_id=self.model["id"],
            key_id=self.crypto.key_id(),
            input=ciphertext if inline else None,
            input_ref=None if inline else self._t.store.put_payload(ciphertext, self.settings.payload_ttl_s),
            submitted_at=time.time(),
        )
        result = self._t.send(QUERY_TASK, {"request": request.encode()}, queue=model_queue(request.model_id),
                              expires_s=self.settings.query_timeout_s)
        return QueryHandle(self, result, request.submitted_at)

    def execute(self, ciphertext: bytes, timeout: float | None = None) -> bytes:
        handle = self.submit(ciphertext)
        output = handle.result(timeout)
        self.last_timings = handle.timings
        return output

    def decrypt(self, output: bytes) -> np.ndarray:
        encrypted = EncryptedOutput.decode(output)
        if encrypted.model_id != self.model["id"]:
            raise ModelMismatch("This result belongs to another model.")
        if encrypted.key_id != self.crypto.key_id():  # also loads the key set from key_dir
            raise KeyMismatch("This result was computed under other keys than this client's; it cannot be decrypted here.")
        return self.crypto.decrypt(encrypted.data)

    def predict(self, x: Any, timeout: float | None = None) -> np.ndarray:
        """Encrypt, execute and decrypt; a 2-D ``x`` runs its rows as concurrent queries
        (all are submitted first, so the pool works on them in parallel while we wait)."""
        x = np.asarray(x)
        if x.ndim == 1:
            return self._predict_one(x, timeout)
        handles = [self.submit(self.encrypt(row)) for row in x]
        return np.concatenate([self.decrypt(h.result(timeout)) for h in handles])

    def _predict_one(self, x: np.ndarray, timeout: float | None) -> np.ndarray:
        t0 = time.perf_counter()
        ciphertext = self.encrypt(x)
        t1 = time.perf_counter()
        output = self.execute(ciphertext, timeout)
        t2 = time.perf_counter()
        result = self.decrypt(output)
        self.last_timings = {**self.last_timings, "encrypt_s": t1 - t0, "decrypt_s": time.perf_counter() - t2}
        return result

    def _explain_timeout(self) -> None:
        """After a timeout (only then: it costs a round trip), say if no worker serves the model."""
        described = self._t.call(CLIENT_TASK + "describe", token=self.token)
        if not described.get("running_workers"):
            raise ModelUnavailable(
                f"No worker serves model {described['name']!r}: ask its provider to start one "
                "(`cipherpool worker start`). The query was withdrawn."
            )

    def close(self) -> None:
        self._t.close()
