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

    def encode(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def decode(cls, obj: dict[str, Any]) -> QueryReply:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


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
