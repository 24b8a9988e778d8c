"""What travels: small frozen dataclasses with ``encode``/``decode``, msgpack on the wire.

* :class:`EncryptedInput` / :class:`EncryptedOutput` are the bytes a user holds (the CLI's
  files). Besides the concrete ciphertext they name the model and the evaluation key they
  belong to: concrete cannot tell that a ciphertext was encrypted under another client's keys
  (measured: it computes garbage silently), so the platform refuses the mismatch up front.
* :class:`QueryRequest` / :class:`QueryReply` are a query task's kwargs and result. Large
  ciphertexts travel by reference (``*_ref``) through the blob store. A request carries ids
  only (token, key set, evaluation-key blob): it was authorised before it was published (by
  the gateway, or by trusted in-cluster code), and never holds a credential.
* :func:`ok` / :func:`failed` / :func:`unwrap` are the result envelope of every task.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Self, TypedDict

import msgpack

from cipherpool.errors import CipherpoolError, InvalidInput, MalformedCiphertext, RemoteError, from_wire


@dataclass(frozen=True)
class _Envelope:
    FORMAT: ClassVar[str] = ""
    model_id: str
    key_id: str
    data: bytes

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"format": self.FORMAT, "model": self.model_id, "key": self.key_id, "data": self.data},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        try:
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise TypeError(f"{type(raw).__name__}, not bytes")
            obj = msgpack.unpackb(raw, raw=False, max_bin_len=len(raw), max_str_len=1024, max_array_len=16, max_map_len=16)
            if not isinstance(obj, dict) or obj.get("format") != cls.FORMAT:
                raise ValueError("unknown format")
            model, key, data = obj["model"], obj["key"], obj["data"]
            if not (isinstance(model, str) and isinstance(key, str) and isinstance(data, bytes)):
                raise TypeError("wrong field types")
            return cls(model_id=model, key_id=key, data=data)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise MalformedCiphertext(
                f"Not a cipherpool {cls.FORMAT.rsplit('/', 2)[1]} ({exc}); "
                "pass the bytes that encrypt()/execute() produced, unmodified."
            ) from None


@dataclass(frozen=True)
class EncryptedInput(_Envelope):
    FORMAT: ClassVar[str] = "cipherpool/ciphertext/1"


@dataclass(frozen=True)
class EncryptedOutput(_Envelope):
    FORMAT: ClassVar[str] = "cipherpool/result/1"


_REQUEST_TYPES: dict[str, tuple[type, ...]] = {
    "token_id": (str,),
    "model_id": (str,),
    "key_id": (str,),
    "blob_id": (str,),
    "input": (bytes, type(None)),
    "input_ref": (str, type(None)),
    "submitted_at": (int, float),
    "version": (int,),
    "account_id": (str,),
}


@dataclass(frozen=True)
class QueryRequest:
    token_id: str  # the authorised token's id (never its value)
    model_id: str
    key_id: str  # the client's key set, as named in its ciphertexts
    blob_id: str  # sha256 of that key set's evaluation key in the blob store
    input: bytes | None = None  # the EncryptedInput bytes, when small enough to inline
    input_ref: str | None = None  # else a payload id in the blob store
    submitted_at: float = 0.0  # wall clock at submission, for queue-wait figures
    version: int = 0  # the model version to run it on (the one its keys were made for); 0: the node's serving one
    account_id: str = ""  # the model's account: a shared node meters execution time per account

    def encode(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def decode(cls, obj: Any) -> QueryRequest:
        """A request from the wire, type-checked: a hand-made message gets a typed refusal."""
        required = {"token_id", "model_id", "key_id", "blob_id"}
        known = {k: v for k, v in obj.items() if k in _REQUEST_TYPES} if isinstance(obj, dict) else {}
        ok_shape = required <= set(known) and all(isinstance(v, _REQUEST_TYPES[k]) for k, v in known.items())
        if not ok_shape or (known.get("input") is None) == (known.get("input_ref") is None):
            raise InvalidInput("Malformed query message; submit queries through the gateway or cipherpool.tasks.submit.")
        return cls(**known)  # unknown fields are ignored: a newer publisher reaches an older node


@dataclass(frozen=True)
class QueryReply:
    output: bytes | None = None
    output_ref: str | None = None
    node: str = ""
    version: int = 0  # the model version that computed it
    key_cache: str = ""  # "hit" or "miss"
    timings: dict[str, float] = field(default_factory=dict)  # seconds, per step
    batch: int = 0  # a batch's reply: how many items its output (a framed batch, BATCH_RESULT) holds; 0: one query

    def encode(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> QueryReply:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


# Batches: many ciphertexts in one request, one task, one result (docs/http-api.md, "Batches").
# A framed body is a magic, a count and the frames in order; each frame is a kind byte, a
# length and that many bytes. Requests hold ITEM frames (EncryptedInput envelopes); results
# hold, in the same order, ITEM frames (EncryptedOutput envelopes) or ERROR frames (the
# item's typed error as UTF-8 JSON {code, message}). Lengths are little-endian uint32.
BATCH_MAGIC = b"CPB1"
BATCH_CONTENT_TYPE = "application/vnd.cipherpool.batch"
ITEM, ERROR = 0, 1
_COUNT = struct.Struct("<I")
_FRAME = struct.Struct("<BI")


def pack_batch(frames: Sequence[tuple[int, bytes]]) -> bytes:
    """A framed batch of ``(kind, bytes)`` frames."""
    parts = [BATCH_MAGIC, _COUNT.pack(len(frames))]
    for kind, data in frames:
        parts += [_FRAME.pack(kind, len(data)), data]
    return b"".join(parts)


def unpack_batch(body: bytes, max_items: int) -> list[tuple[int, bytes]]:
    """The frames of a framed batch; ``MalformedCiphertext`` for anything that is not one
    exactly (a wrong magic, a count over ``max_items`` or that disagrees with the frames, a
    frame of an unknown kind, trailing bytes)."""
    view = memoryview(body)
    if len(view) < 8 or bytes(view[:4]) != BATCH_MAGIC:
        raise MalformedCiphertext("Not a cipherpool batch (no batch header); frame the ciphertexts with pack_batch().")
    (count,) = _COUNT.unpack_from(view, 4)
    if count == 0 or count > max_items:
        raise MalformedCiphertext(f"A batch holds 1 to {max_items} items; this one says {count}.")
    frames: list[tuple[int, bytes]] = []
    at = 8
    for _ in range(count):
        if at + _FRAME.size > len(view):
            raise MalformedCiphertext("This batch is truncated: it holds fewer items than its header says.")
        kind, length = _FRAME.unpack_from(view, at)
        at += _FRAME.size
        if kind not in (ITEM, ERROR) or at + length > len(view):
            raise MalformedCiphertext("This batch is truncated or holds a frame of an unknown kind.")
        frames.append((kind, bytes(view[at : at + length])))
        at += length
    if at != len(view):
        raise MalformedCiphertext("This batch has bytes after its last item.")
    return frames


def error_frame(error: CipherpoolError) -> tuple[int, bytes]:
    """An item's typed error as a result frame."""
    return ERROR, json.dumps(error.to_wire(), separators=(",", ":")).encode()


def batch_items(body: bytes, max_items: int) -> list[bytes | CipherpoolError]:
    """A batch result's items in order: each item's EncryptedOutput bytes, or its typed error
    (the class registered for its code, not raised)."""
    items: list[bytes | CipherpoolError] = []
    for kind, data in unpack_batch(body, max_items):
        if kind == ITEM:
            items.append(data)
            continue
        try:
            wire = json.loads(data)
        except ValueError:
            wire = {}
        items.append(from_wire(wire if isinstance(wire, dict) else {}))
    return items


class OkEnvelope(TypedDict):
    ok: Literal[True]
    value: object


class FailedEnvelope(TypedDict):
    ok: Literal[False]
    error: dict[str, str]  # CipherpoolError.to_wire(): code and message


Envelope = OkEnvelope | FailedEnvelope


def ok(value: object = None) -> OkEnvelope:
    return {"ok": True, "value": value}


def failed(error: CipherpoolError) -> FailedEnvelope:
    return {"ok": False, "error": error.to_wire()}


def unwrap(envelope: object) -> object:
    """The value of a task result, or the typed error it carries raised on this side."""
    if not isinstance(envelope, dict) or "ok" not in envelope:
        raise RemoteError("The platform answered with something that is not a result envelope.")
    if envelope["ok"]:
        return envelope.get("value")
    raise from_wire(envelope.get("error") or {})


SECRET_FIELDS = frozenset({"api_key", "token", "password"})
BULKY_FIELDS = frozenset({"input", "output", "request"})


def redacted_kwargs(kwargs: dict[str, Any]) -> str:
    """What logs and Flower show of a task's kwargs: no credentials, no ciphertexts."""
    shown = {}
    for key, value in kwargs.items():
        if key in SECRET_FIELDS:
            shown[key] = "***"
        elif key in BULKY_FIELDS or isinstance(value, (bytes, bytearray)):
            shown[key] = "<omitted>"
        else:
            shown[key] = value
    return repr(shown)
