"""QueryClient: what an end user runs on their own machine.

Keys are generated here and the secret key never leaves ``key_dir`` (0700, files 0600); the
platform sees the evaluation key (uploaded once, streamed) and ciphertexts. ``predict`` is
``decrypt(execute(encrypt(x)))``. Everything goes through the gateway over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from cipherpool.api.schemas import ClientModelOut, KeyOut, KeySetOut, QueryAccepted, WarmupOut
from cipherpool.client.base import GatewayClient
from cipherpool.client.transport import client_settings
from cipherpool.config.settings import Settings
from cipherpool.credentials import digest
from cipherpool.errors import (
    CipherpoolError,
    EvaluationKeyExpired,
    EvaluationKeyNotFound,
    GatewayUnavailable,
    KeyMismatch,
    KeysOutdated,
    ModelMismatch,
    ModelUnavailable,
    QueryTimeout,
    RemoteError,
)
from cipherpool.fhe.client import KEY_ID_FILE, ClientCrypto
from cipherpool.files import private_dir, write_private
from cipherpool.messages import BATCH_CONTENT_TYPE, ITEM, EncryptedInput, EncryptedOutput, batch_items, pack_batch

if TYPE_CHECKING:  # numpy is imported where arrays are made: listing or deleting keys needs none
    from numpy.typing import ArrayLike, NDArray

OCTET = {"Content-Type": "application/octet-stream"}
BATCH = {"Content-Type": BATCH_CONTENT_TYPE}
R = TypeVar("R")
UPLOAD_TIMEOUT_S = 600.0
POLL_GRACE_S = 30.0  # HTTP timeout beyond a long poll's own wait
# After a result's timeout, withdrawing the query and saying why share this long past the
# caller's deadline (retries and each try's wait included), not gateway_retry_s each.
AFTER_TIMEOUT_GRACE_S = 2.0
MIN_TRY_S = 0.5  # a try's wait, at least, even at that deadline (to be sent and answered at all)
# In each key directory (one per model and client specs): the model version those specs were
# fetched for, and a mark that this key set was uploaded from here (so "again" is true).
MADE_FOR_FILE = "made_for_version"
UPLOADED_FILE = "uploaded"
PROBE_ROWS = 4  # predict on many rows: the first batch, whose compute per item sizes the others


@dataclass
class QueryHandle:
    """A submitted query; ``result()`` waits for the encrypted output (idempotent)."""

    client: QueryClient
    id: str
    submitted_at: float
    version: int | None = None  # the model version that computed it
    key_cache: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _output: bytes | None = None

    def status(self) -> str:
        """``queued``, ``started`` or ``done`` (a failed query raises its error)."""
        if self._output is not None:
            return "done"
        response = self.client._poll(self.id, 0.0)
        if response.status_code == 200:
            self._take(response)
            return "done"
        return QueryAccepted.model_validate_json(response.content).status

    def result(self, timeout: float | None = None) -> bytes:
        """The encrypted output (an EncryptedOutput envelope); waits at most timeout seconds.

        Long-polls the gateway (each request at most its long-poll bound) until the result
        is there or the timeout passes; then the query is withdrawn and the error says
        whether any worker serves the model. A gateway restart meanwhile is ridden out (the
        polls retry); a gateway still away at the timeout raises GatewayUnavailable. Withdrawing
        and explaining, retries included, end AFTER_TIMEOUT_GRACE_S after the timeout (a last
        try gets MIN_TRY_S at least), not gateway_retry_s after each."""
        if self._output is not None:
            return self._output
        deadline = time.monotonic() + (timeout or self.client.settings.query_timeout_s)
        while (remaining := deadline - time.monotonic()) > 0:
            response = self.client._poll(self.id, remaining)
            if response.status_code == 200:
                return self._take(response)
        until = deadline + AFTER_TIMEOUT_GRACE_S
        self.client._withdraw(self.id, until)
        self.client._explain_timeout(until)
        raise QueryTimeout(f"No answer within {timeout or self.client.settings.query_timeout_s:g}s; the query was withdrawn.")

    def _take(self, response: httpx.Response) -> bytes:
        self.version = int(response.headers.get("x-cipherpool-model-version") or 0) or None
        self.key_cache = response.headers.get("x-cipherpool-key-cache")
        try:
            server = json.loads(response.headers.get("x-cipherpool-timings", "{}"))
        except ValueError:
            raise RemoteError("The gateway sent unreadable timings.") from None
        self.timings = {**server, "end_to_end_s": time.time() - self.submitted_at}
        self._output = response.content
        return self._output


class QueryClient(GatewayClient):
    """An end user's handle: ``QueryClient(token, url=..., model=...)``; the URL as for
    ManagementClient. ``model`` names the model when the token queries several.

    Keys belong to a model version's client specs: when the provider deploys a version with
    other specs, queries with the old keys are refused with ``KeysOutdated``; ``refresh()``
    then ``generate_keys()`` and ``upload_evaluation_keys()`` (``predict`` does it by itself).

    Key sets have a lifecycle on the platform: one unused for a while expires, and its token's
    end user may delete it (``list_keys()``, ``delete_keys()``). A query whose key set the
    platform no longer holds (``EvaluationKeyExpired``, ``EvaluationKeyNotFound``) makes the
    client upload it again and retry once, by itself; ``ensure_keys()`` does it ahead of time.
    What it did is appended to ``key_actions`` (the CLI prints it).

    A query for a model with no worker up is refused at once (``NoWorkerUp``);
    ``wait_for_worker=True`` (here, or per call) queues it until a worker is up instead.
    ``mode``: ``auto`` (a dedicated worker when one is up, else a shared node, if the model
    allows them), ``dedicated`` or ``shared``."""

    def __init__(
        self,
        token: str | None = None,
        url: str | None = None,
        *,
        model: str | None = None,
        key_dir: str | Path | None = None,
        settings: Settings | None = None,
        wait_for_worker: bool = False,
        mode: str = "auto",
    ):
        settings = client_settings(url, settings)
        super().__init__(token or settings.token, url, settings, "No access token: pass token= or set CIPHERPOOL_TOKEN.")
        self.model_name = model
        self.wait_for_worker = wait_for_worker
        self.mode = mode  # auto | dedicated | shared: where queries run (auto: dedicated when a worker is up)
        self._params = {"model": model} if model else {}
        self._token = self._t.credential
        self.key_dir = Path(key_dir) if key_dir else self.settings.data_dir / "client" / digest(self.token)[:16]
        self._model: ClientModelOut | None = None
        self._crypto: ClientCrypto | None = None
        self.last_timings: dict[str, float] = {}
        self.last_version: int | None = None  # the model version that answered the last execute()
        self.last_warmup: WarmupOut | None = None  # what the last key upload's warm-up did
        self.key_actions: list[str] = []  # what the client did with its keys by itself, in order
        self.keys_version: int | None = None  # the model version this client's keys were made for
        self._moved_from: int | None = None  # keys of an older version in key_dir, until new ones are uploaded

    @property
    def token(self) -> str:
        return self._token

    @token.setter
    def token(self, value: str) -> None:
        """Query with another token from now on (keys stay in key_dir)."""
        self._token = value
        self._t.set_credential(value)

    @property
    def model(self) -> ClientModelOut:
        """The model this client queries (id, name, status, serving version); fetched once."""
        if self._model is None:
            self._model = self._describe()
        return self._model

    @property
    def crypto(self) -> ClientCrypto:
        """Keys and encryption for the serving version's client specs (one key directory per specs)."""
        if self._crypto is None:
            model = self.model
            client_zip = self._t.request("GET", "/v1/client/model/client.zip", params=self._params).content
            if digest_bytes(client_zip) != model.client_zip_sha256:
                raise RemoteError("The model's client specs arrived damaged or changed meanwhile; try again.")
            private_dir(self.key_dir)
            directory = self.key_dir / f"{model.id}-{model.client_zip_sha256[:12]}"
            self._crypto = ClientCrypto(client_zip, directory)
            made_for = directory / MADE_FOR_FILE
            if not made_for.exists():
                write_private(made_for, str(model.version))
            self.keys_version = _int_in(made_for) or model.version
            if not (directory / UPLOADED_FILE).exists():  # keys for these specs not uploaded yet: did the model move on?
                self._moved_from = self._older_keys(model.id, directory)
        return self._crypto

    def _older_keys(self, model_id: str, current: Path) -> int | None:
        """The version that this client's newest other key set for the model was made for (a
        key directory of other client specs: the model moved on since), if it has one."""
        others = [
            d
            for d in self.key_dir.glob(f"{model_id}-*")
            if d != current and (d / KEY_ID_FILE).exists() and (d / MADE_FOR_FILE).exists()
        ]
        newest = max(others, key=lambda d: (d / KEY_ID_FILE).stat().st_mtime, default=None)
        return None if newest is None else _int_in(newest / MADE_FOR_FILE)

    def refresh(self) -> ClientModelOut:
        """Forget the model's description and client specs (after ``KeysOutdated``: the model
        serves another version); the next call fetches them again."""
        self._model, self._crypto = None, None
        return self.model

    def generate_keys(self, force: bool = False) -> str:
        """Create (or reload) this client's keys; returns the key set's id."""
        if force:
            self._uploaded_mark().unlink(missing_ok=True)  # a new key set: not uploaded yet
        return self.crypto.generate_keys(force=force)

    def _uploaded_mark(self) -> Path:
        return Path(getattr(self.crypto, "key_dir", self.key_dir)) / UPLOADED_FILE

    def _uploaded_before(self) -> bool:
        return self._uploaded_mark().exists()

    def upload_evaluation_keys(self, warm_up: bool = True) -> str:
        """Upload the evaluation key under this key set's id (stored once per content), which
        it returns. The secret key is not sent: it never leaves key_dir.

        ``warm_up`` (if the gateway has it on): then send one throwaway ciphertext (of zeros)
        under the new keys, which each node serving the model evaluates once, so that the
        first real query finds the key deserialized and used. It returns when they are done."""
        key_id = self.crypto.key_id()
        params = {**self._params, "specs": self.model.client_zip_sha256}
        self._t.call(
            "PUT",
            f"/v1/client/keys/{key_id}",
            KeyOut,
            content=self.crypto.evaluation_key(),
            headers=OCTET,
            timeout=UPLOAD_TIMEOUT_S,
            params=params,
        )
        if getattr(self.crypto, "key_dir", None) is not None:
            write_private(self._uploaded_mark(), key_id)
        model = self.model
        if self._moved_from is not None:
            self._note_moved(self._moved_from, model, key_id)
        if warm_up and model.key_warmup and model.input_shape and model.running_workers:
            import numpy as np

            self.last_warmup = self._t.call(
                "POST",
                f"/v1/client/keys/{key_id}/warmup",
                WarmupOut,
                headers=OCTET,
                timeout=UPLOAD_TIMEOUT_S,
                content=self.encrypt(np.zeros(model.input_shape[1:] or model.input_shape)),
            )
        return key_id

    def list_keys(self) -> list[KeySetOut]:
        """This token's key sets on the platform: model, the version each was made for, size,
        last use, status (active, outdated, expired) and when it expires unused."""
        return self._t.call("GET", "/v1/client/keys", list[KeySetOut])

    def delete_keys(self, key_id: str | None = None) -> str:
        """Delete a key set of this token from the platform (default: this client's current
        one); the keys stay in key_dir. Returns its id."""
        key_id = key_id or self.crypto.key_id()
        self._t.request("DELETE", f"/v1/client/keys/{key_id}")
        return key_id

    def ensure_keys(self) -> str:
        """Make sure the platform holds a usable key set of this client's for the model's
        serving version (as ``keys.ensure()`` on hosted platforms): keys are generated for the
        serving client specs if this client has none for them, and uploaded unless the
        platform holds them, active. Returns "kept" or "uploaded"."""
        current = self._describe()
        changed = self._model is not None and current.client_zip_sha256 != self._model.client_zip_sha256
        if changed or self._model is None:  # the model serves other client specs: keys for those
            self._crypto = None
        self._model = current
        key_id = self.generate_keys()
        held = next((k for k in self.list_keys() if k.key_id == key_id), None)
        if held is not None and held.status == "active":
            return "kept"
        moved = self._moved_from is not None
        self.upload_evaluation_keys()  # says so itself if the model moved on from older keys here
        if not moved:
            why = "none was on the platform" if held is None else f"it was {held.status.value}"
            made = f" for version {current.version}'s client specs" if changed else ""
            self._note(f"uploaded key set {key_id[:12]}…{made}: {why}")
        return "uploaded"

    def _upload_if_never(self) -> None:
        """Before a first query: upload this key set if it was never uploaded from here (keys
        generated as needed), rather than have the gateway refuse the query first."""
        if self._uploaded_before():
            return
        made = not (Path(getattr(self.crypto, "key_dir", self.key_dir)) / KEY_ID_FILE).exists()
        moved = self._moved_from is not None
        key_id = self.upload_evaluation_keys()  # says so itself if the model moved on from older keys here
        if not moved:
            done = "generated key set {}… and uploaded it" if made else "uploaded key set {}…: it was not uploaded yet"
            self._note(done.format(key_id[:12]))

    def _note(self, action: str) -> None:
        self.key_actions.append(action)

    def _note_moved(self, old: int, model: ClientModelOut, key_id: str) -> None:
        """Keys made for an older version were replaced: say which versions, and what was done."""
        self._moved_from = None
        self._note(
            f"model {model.name!r} moved from version {old} to version {model.version} (other client specs): "
            f"generated new keys (key set {key_id[:12]}…) and uploaded them"
        )

    def _with_keys(self, send: Callable[[], R]) -> R:
        """``send()`` a query under this client's key set; if the platform no longer holds it
        (it expired, or was deleted), upload it again and send once more. Keys made for other
        client specs (``KeysOutdated``) cannot be fixed here: the ciphertext was encrypted
        under them (``predict`` generates new keys and encrypts again)."""
        try:
            return send()
        except EvaluationKeyNotFound as exc:
            moved, again = self._moved_from is not None, self._uploaded_before()
            key_id = self.upload_evaluation_keys()  # says so itself if the model moved on from older keys here
            if isinstance(exc, EvaluationKeyExpired):
                self._note(f"key set {key_id[:12]}… had expired: uploaded it again and retried the query")
            elif again:
                self._note(f"key set {key_id[:12]}… was no longer on the platform: uploaded it again and retried the query")
            elif not moved:
                self._note(f"key set {key_id[:12]}… was not uploaded yet: uploaded it and retried the query")
        return send()

    def encrypt(self, x: ArrayLike) -> bytes:
        return EncryptedInput(self.model.id, self.crypto.key_id(), self.crypto.encrypt(x)).encode()

    def submit(self, ciphertext: bytes, *, wait_for_worker: bool | None = None) -> QueryHandle:
        """Queue a query and return at once; ``handle.result()`` waits for it."""
        self._check_own(ciphertext)
        submitted = time.time()
        response = self._with_keys(
            lambda: self._t.request(
                "POST",
                "/v1/queries",
                content=ciphertext,
                headers=OCTET,
                params=self._submit_params(wait_for_worker),
                query_path=True,
            )
        )
        return QueryHandle(self, QueryAccepted.model_validate_json(response.content).id, submitted)

    def _submit_params(self, wait_for_worker: bool | None, **params: float) -> dict[str, float | str]:
        waiting = self.wait_for_worker if wait_for_worker is None else wait_for_worker
        return {
            **params,
            **({"wait_for_worker": "true"} if waiting else {}),
            **({"mode": self.mode} if self.mode != "auto" else {}),
        }

    def execute(self, ciphertext: bytes, timeout: float | None = None, *, wait_for_worker: bool | None = None) -> bytes:
        """Run the model on a ciphertext; the encrypted output. One round trip when the result
        is ready within the gateway's long-poll bound, else it keeps polling."""
        self._check_own(ciphertext)
        timeout = timeout or self.settings.query_timeout_s
        wait = min(timeout, self.settings.long_poll_s)
        submitted = time.time()
        response = self._with_keys(
            lambda: self._t.request(
                "POST",
                "/v1/queries",
                content=ciphertext,
                headers=OCTET,
                params=self._submit_params(wait_for_worker, wait=wait),
                timeout=wait + POLL_GRACE_S,
                query_path=True,
            )
        )
        if response.status_code == 200:
            handle = QueryHandle(self, response.headers.get("x-cipherpool-query", ""), submitted)
            output = handle._take(response)
        else:
            handle = QueryHandle(self, QueryAccepted.model_validate_json(response.content).id, submitted)
            output = handle.result(max(0.001, timeout - (time.time() - submitted)))
        self.last_timings, self.last_version = handle.timings, handle.version
        return output

    def decrypt(self, output: bytes) -> NDArray[Any]:
        encrypted = EncryptedOutput.decode(output)
        if encrypted.model_id != self.model.id:
            raise ModelMismatch("This result belongs to another model.")
        if encrypted.key_id != self.crypto.key_id():  # also loads the key set from key_dir
            raise KeyMismatch("This result was computed under other keys than this client's; it cannot be decrypted here.")
        return self.crypto.decrypt(encrypted.data)

    def predict(self, x: ArrayLike, timeout: float | None = None) -> NDArray[Any]:
        """Encrypt, execute and decrypt one sample (a row of features, or one image without
        the batch axis); many (rows, or images) go as batches (:meth:`predict_many`: all are
        submitted first, so the pool works on them in parallel while we wait)."""
        import numpy as np

        x = np.asarray(x)
        self._upload_if_never()
        try:
            return self._predict(x, timeout)
        except KeysOutdated:  # the model serves a version with other client specs: new keys, once
            old = self.keys_version
            model = self.refresh()
            self.generate_keys()
            if old is not None and old != model.version:
                self._moved_from = old
            moved = self._moved_from is not None
            key_id = self.upload_evaluation_keys()  # says which versions, and what it did
            if not moved:
                self._note(
                    f"the platform found key set {key_id[:12]}… outdated for model {model.name!r} (version "
                    f"{model.version}): fetched its client specs again, uploaded the keys and retried the query"
                )
            return self._predict(x, timeout)

    def _predict(self, x: NDArray[Any], timeout: float | None) -> NDArray[Any]:
        shape = self.crypto.input_shape  # with the batch axis: one image is (1, 66, 66) for [1, 1, 66, 66]
        if x.ndim == 1 or (shape and x.ndim == len(shape) - 1):
            return self._predict_one(x, timeout)

        if len(x) == 1:
            return self.decrypt(self.submit(self.encrypt(x[0])).result(timeout))
        return self._predict_many(x, timeout)

    def predict_many(self, x: ArrayLike, timeout: float | None = None) -> NDArray[Any]:
        """Encrypt, execute and decrypt many samples (rows, or images with the batch axis),
        sent in batches of at most ``settings.batch_size`` (each one task on one node, all
        submitted before any is waited for); decrypted item by item, in order. An item the
        platform refused raises its typed error (``execute_many`` returns it in its place)."""
        import numpy as np

        rows = np.asarray(x)
        self._upload_if_never()
        try:
            return self._predict_many(rows, timeout)
        except KeysOutdated:  # as predict: new keys once, then again
            self.refresh()
            self.generate_keys()
            self.upload_evaluation_keys()
            return self._predict_many(rows, timeout)

    def _predict_many(self, x: NDArray[Any], timeout: float | None) -> NDArray[Any]:
        """The first few rows go first, as a probe: the node's compute per item says how many
        rows fit ``batch_target_s`` (a batch is one task on one node, and must end well within
        the broker's visibility timeout and the query timeout); the rest then go at once, in
        batches of that many (at most ``batch_size``)."""
        import numpy as np

        size = max(1, min(self.settings.batch_size, self.settings.batch_max_items))
        probe = min(len(x), size, PROBE_ROWS)
        first = self.submit_many([self.encrypt(row) for row in x[:probe]])
        decrypted = self._decrypt_batch(first, timeout, probe)
        per_item = first.timings.get("compute_s", 0.0) / probe
        if per_item > 0:
            size = max(1, min(size, int(self.settings.batch_target_s / per_item)))
        rest = x[probe:]
        handles = [self.submit_many([self.encrypt(row) for row in rest[i : i + size]]) for i in range(0, len(rest), size)]
        for handle in handles:
            decrypted += self._decrypt_batch(handle, timeout, size)
        return np.concatenate(decrypted)

    def _decrypt_batch(self, handle: QueryHandle, timeout: float | None, size: int) -> list[NDArray[Any]]:
        decrypted = []
        for item in batch_items(handle.result(timeout), size):
            if isinstance(item, CipherpoolError):
                raise item
            decrypted.append(self.decrypt(item))
        return decrypted

    def submit_many(self, ciphertexts: list[bytes], *, wait_for_worker: bool | None = None) -> QueryHandle:
        """Queue a batch of ciphertexts (one model, this client's key set) as one query and return
        at once: ``handle.result()`` is the framed batch result (``cipherpool.messages.batch_items``
        reads it: each item's EncryptedOutput, or its typed error, in order)."""
        for ciphertext in ciphertexts:
            self._check_own(ciphertext)
        body = pack_batch([(ITEM, c) for c in ciphertexts])
        submitted = time.time()
        response = self._with_keys(
            lambda: self._t.request(
                "POST",
                "/v1/queries/batch",
                content=body,
                headers=BATCH,
                params=self._submit_params(wait_for_worker),
                query_path=True,
            )
        )
        return QueryHandle(self, QueryAccepted.model_validate_json(response.content).id, submitted)

    def execute_many(
        self, ciphertexts: list[bytes], timeout: float | None = None, *, wait_for_worker: bool | None = None
    ) -> list[bytes | CipherpoolError]:
        """Run the model on a batch of ciphertexts: each item's encrypted output, or the typed
        error that refused that item alone, in order."""
        handle = self.submit_many(ciphertexts, wait_for_worker=wait_for_worker)
        items = batch_items(handle.result(timeout), len(ciphertexts))
        self.last_timings, self.last_version = handle.timings, handle.version
        return items

    def _predict_one(self, x: NDArray[Any], timeout: float | None) -> NDArray[Any]:
        t0 = time.perf_counter()
        ciphertext = self.encrypt(x)
        t1 = time.perf_counter()
        output = self.execute(ciphertext, timeout)
        t2 = time.perf_counter()
        result = self.decrypt(output)
        self.last_timings = {**self.last_timings, "encrypt_s": t1 - t0, "decrypt_s": time.perf_counter() - t2}
        return result

    def _check_own(self, ciphertext: bytes) -> None:
        """Refuse garbage, and a ciphertext under another key set, before a round trip: this
        client could not decrypt the result (the gateway evaluates it with the key set that the
        envelope names, so nothing wrong would be computed, only wasted)."""
        envelope = EncryptedInput.decode(ciphertext)
        if envelope.model_id != self.model.id:
            raise ModelMismatch("This ciphertext was encrypted for another model; encrypt it with this model's client.")
        if envelope.key_id != self.crypto.key_id():
            raise KeyMismatch(
                f"This ciphertext was encrypted under key set {envelope.key_id[:12]}…, not this client's "
                f"({self.crypto.key_id()[:12]}…): encrypt with this client's keys (and decrypt with the same)."
            )

    def _describe(self, until: float | None = None) -> ClientModelOut:
        return self._t.call("GET", "/v1/client/model", ClientModelOut, params=self._params, **_bounded(until))

    def _poll(self, query_id: str, remaining: float) -> httpx.Response:
        """One long poll of at most ``remaining`` seconds (0: a status check). The query is safe
        in the platform while the gateway restarts, so a poll that loses the gateway retries
        (a GET) until the same deadline, each try waiting no longer than what is left of it;
        a status check retries for ``gateway_retry_s``."""

        def one_try(left: float) -> dict[str, Any]:
            wait = min(max(0.0, left), self.settings.long_poll_s) if remaining > 0 else 0.0
            return {"params": {"wait": wait}, "timeout": wait + POLL_GRACE_S}

        deadline = time.monotonic() + remaining if remaining > 0 else None
        return self._t.request("GET", f"/v1/queries/{query_id}", retry_until=deadline, refresh=one_try, query_path=True)

    def _withdraw(self, query_id: str, until: float | None = None) -> None:
        """Withdraw a query; with ``until`` (a ``time.monotonic()`` deadline), retried and
        waited for no longer than that."""
        self._t.request("DELETE", f"/v1/queries/{query_id}", **_bounded(until))

    def _explain_timeout(self, until: float | None = None) -> None:
        """After a timeout (only then: it costs a round trip), say if no worker serves the model;
        with ``until``, asked no longer than that. A best effort: the timeout stays the error
        when the gateway does not answer by then (the query was withdrawn)."""
        try:
            described = self._describe(until)
        except GatewayUnavailable:
            if until is None:
                raise
            return
        if not described.running_workers:
            raise ModelUnavailable(
                f"No worker serves model {described.name!r}: ask its provider to start one "
                "(`cipherpool worker start`). The query was withdrawn."
            )


def _int_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _bounded(until: float | None) -> dict[str, Any]:
    """A request's kwargs that end its retries, and each try's wait, at ``until`` (a
    ``time.monotonic()`` deadline); none when None (the transport's own bounds)."""
    if until is None:
        return {}
    return {"retry_until": until, "refresh": lambda left: {"timeout": max(MIN_TRY_S, left)}}


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
