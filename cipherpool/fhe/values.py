"""A ciphertext checked for what concrete needs before it evaluates one, without concrete.

A ciphertext is one concrete ``Value`` (``concrete-protocol.capnp``), a Cap'n Proto message::

    struct Value    { payload @0 :Payload; rawInfo @1 :RawInfo; typeInfo @2 :TypeInfo; }
    struct Payload  { data @0 :List(Data); }
    struct RawInfo  { shape @0 :Shape; integerPrecision @1 :UInt32; isSigned @2 :Bool; }
    struct Shape    { dimensions @0 :List(UInt32); }
    struct TypeInfo { union { lweCiphertext @0 ...; plaintext @1 ...; index @2 ...; } }

Concrete's server checks each input only once it runs the circuit (its transport-value
verifier): a message without payload, raw or type information, or whose payload is not
``integerPrecision / 8 × ∏ shape`` bytes, raises a ``RuntimeError`` there (``Tried to
transform a transport value without payload.``), which reached users as a 502 and counted as
the model's failure. :func:`check_ciphertext` reads the same facts from the message's
pointers (a few words, never the payload itself) and refuses such a ciphertext as
``invalid_ciphertext`` wherever it is met first: the gateway before a query is counted or
published, the node before it takes the key. Whether the value fits *this* model's input (its
raw and type information equal the circuit's) is left to concrete, which tells it apart as
``model_mismatch``; its other verifier errors are turned into ``invalid_ciphertext`` by the
evaluator.
"""

from __future__ import annotations

import struct

from cipherpool.errors import InvalidCiphertext, MalformedCiphertext
from cipherpool.fhe.framing import MAX_SEGMENTS, WORD, is_complete_message

MAX_CHUNKS = 1 << 16  # payload blobs read (concrete writes one per 512 MiB)
MAX_DIMENSIONS = 32
MAX_FAR_HOPS = 2  # a far pointer lands on a pad, a double-far pad on a far pointer and a tag
STRUCT, LIST, FAR = 0, 1, 2
BYTE_ELEMENTS, FOUR_BYTE_ELEMENTS, POINTER_ELEMENTS = 2, 4, 6
PRECISIONS = (8, 16, 32, 64)


class _Unreadable(Exception):
    """The message's pointers lead outside it or to the wrong kind of object."""


class _Message:
    """The segments of a framed message, read by word; every read is bounds-checked."""

    def __init__(self, data: bytes):
        count = struct.unpack_from("<I", data, 0)[0] + 1
        if count > MAX_SEGMENTS:
            raise _Unreadable("too many segments")
        sizes = struct.unpack_from(f"<{count}I", data, 4)
        start = 4 + 4 * count
        start += (-start) % WORD
        self.data = data
        self.segments: list[tuple[int, int]] = []  # (byte offset, words)
        for size in sizes:
            self.segments.append((start, size))
            start += WORD * size

    def word(self, segment: int, index: int) -> int:
        if not 0 <= segment < len(self.segments):
            raise _Unreadable("a pointer names a segment that is not there")
        start, words = self.segments[segment]
        if not 0 <= index < words:
            raise _Unreadable("a pointer leads outside its segment")
        value: int = struct.unpack_from("<Q", self.data, start + WORD * index)[0]
        return value

    def within(self, segment: int, index: int, words: int) -> bool:
        return 0 <= segment < len(self.segments) and index >= 0 and index + words <= self.segments[segment][1]

    def bytes_at(self, segment: int, index: int, length: int) -> int:
        """``length``, once checked to lie within the segment from word ``index``."""
        if not self.within(segment, index, -(-length // WORD)):
            raise _Unreadable("a list runs past its segment")
        return length

    def resolve(self, segment: int, index: int) -> tuple[int, int, int] | None:
        """The pointer at word ``index`` of ``segment``, followed through far pointers: the
        segment and word its object starts at and the pointer that describes it; None if null."""
        pointer = self.word(segment, index)
        if pointer == 0:
            return None
        for _ in range(MAX_FAR_HOPS):
            if pointer & 3 != FAR:
                break
            double, pad, segment = (pointer >> 2) & 1, (pointer >> 3) & 0x1FFFFFFF, pointer >> 32
            landing = self.word(segment, pad)
            if not double:
                pointer, index = landing, pad
                if pointer & 3 == FAR:
                    raise _Unreadable("a far pointer lands on another far pointer")
                continue
            tag = self.word(segment, pad + 1)
            if landing & 3 != FAR or (landing >> 2) & 1 or tag & 3 == FAR:
                raise _Unreadable("a double-far landing pad is malformed")
            return landing >> 32, (landing >> 3) & 0x1FFFFFFF, tag
        if pointer & 3 == FAR:
            raise _Unreadable("too many far pointers")
        offset = (pointer >> 2) & 0x3FFFFFFF
        if offset & 0x20000000:
            offset -= 0x40000000
        return segment, index + 1 + offset, pointer


class _Struct:
    def __init__(self, message: _Message, target: tuple[int, int, int] | None):
        self.message = message
        self.present = target is not None
        self.segment, self.start, self.data_words, self.pointers = 0, 0, 0, 0
        if target is not None:
            self.segment, self.start, pointer = target
            if pointer & 3 != STRUCT:
                raise _Unreadable("a struct field points at something else")
            self.data_words, self.pointers = (pointer >> 32) & 0xFFFF, pointer >> 48
            if not message.within(self.segment, self.start, self.data_words + self.pointers):
                raise _Unreadable("a struct runs past its segment")

    def uint32(self, offset: int) -> int:
        """The data section's ``offset``-th 32-bit field (0 when the section is shorter)."""
        if not self.present or offset // 2 >= self.data_words:
            return 0
        return (self.message.word(self.segment, self.start + offset // 2) >> (32 * (offset % 2))) & 0xFFFFFFFF

    def pointer(self, index: int) -> tuple[int, int, int] | None:
        if not self.present or index >= self.pointers:
            return None
        return self.message.resolve(self.segment, self.start + self.data_words + index)

    def child(self, index: int) -> _Struct:
        return _Struct(self.message, self.pointer(index))


def _list(target: tuple[int, int, int] | None, element: int) -> tuple[int, int, int]:
    """(segment, first word, element count) of a list of ``element`` size; empty if null."""
    if target is None:
        return 0, 0, 0
    segment, start, pointer = target
    if pointer & 3 != LIST or (pointer >> 32) & 7 != element:
        raise _Unreadable("a list field points at something else")
    return segment, start, pointer >> 35


def _describe(data: bytes) -> str | None:
    """Why concrete could not evaluate this framed value, or None when it could."""
    try:
        message = _Message(data)
        value = _Struct(message, message.resolve(0, 0))
        payload, raw, kind = value.child(0), value.child(1), value.child(2)
        if not payload.present:
            return "it has no payload"
        if not raw.present:
            return "it has no raw information (shape and precision)"
        if not kind.present or kind.pointer(0) is None:
            return "it has no type information"
        precision = raw.uint32(0)
        if precision not in PRECISIONS:
            return f"its integer precision is {precision} bits"
        segment, start, count = _list(raw.child(0).pointer(0), FOUR_BYTE_ELEMENTS)
        if count > MAX_DIMENSIONS:
            return f"its shape has {count} dimensions"
        message.bytes_at(segment, start, 4 * count)
        expected = precision // 8
        for i in range(count):
            expected *= (message.word(segment, start + i // 2) >> (32 * (i % 2))) & 0xFFFFFFFF
        segment, start, count = _list(payload.pointer(0), POINTER_ELEMENTS)
        if count > MAX_CHUNKS:
            return f"its payload is cut in {count} pieces"
        message.bytes_at(segment, start, WORD * count)
        size = 0
        for i in range(count):
            blob_segment, blob_start, length = _list(message.resolve(segment, start + i), BYTE_ELEMENTS)
            size += message.bytes_at(blob_segment, blob_start, length)
        if size == 0:
            return "its payload is empty"
        if size != expected:
            return f"its payload is {size} bytes where its shape and precision make {expected}"
        return None
    except (_Unreadable, struct.error) as exc:
        return f"its structure cannot be read ({exc})"


def check_ciphertext(data: bytes) -> None:
    """Refuse a ciphertext concrete could not evaluate: a broken framing is
    ``malformed_ciphertext``, a framed message that is no usable value ``invalid_ciphertext``."""
    if not is_complete_message(data):
        raise MalformedCiphertext(f"The ciphertext ({len(data)} bytes) is truncated or corrupt; encrypt again.")
    reason = _describe(data)
    if reason is not None:
        raise InvalidCiphertext(f"The ciphertext cannot be evaluated: {reason}. Send what encrypt() produced, unmodified.")


def _pointer(kind: int, offset: int, high: int) -> int:
    """A pointer word: its kind, its signed offset in words, its upper half."""
    return kind | ((offset & 0x3FFFFFFF) << 2) | (high << 32)


def build_value(
    shape: tuple[int, ...] = (1, 4, 3),
    precision: int = 64,
    payload: bytes | None = None,
    *,
    chunks: int = 1,
    raw_info: bool = True,
    type_info: bool = True,
    data: bytes | None = None,
) -> bytes:
    """A concrete ``Value`` message in one segment, as :func:`check_ciphertext` reads one: for
    tests and benchmarks (what a :class:`~cipherpool.fhe.evaluator.FakeEvaluator` is given),
    never an encryption. ``payload`` (default: zeros of the size ``shape`` and ``precision``
    make) in ``chunks`` pieces (0: an empty list), raw information (shape, precision) and type
    information; ``raw_info``/``type_info`` False leave them out; ``data``: a payload of its
    own size (one that disagrees with the shape)."""
    size = precision // 8
    for dim in shape:
        size *= dim
    body = data if data is not None else payload if payload is not None else bytes(size)
    pieces = [body[i * len(body) // chunks : (i + 1) * len(body) // chunks] for i in range(chunks)] if chunks else []
    words: list[int] = [0, 0, 0, 0]  # root pointer, Value's three pointers
    words[0] = _pointer(0, 0, 0 | (3 << 16))  # Value: no data words, three pointers, at word 1
    payload_at = len(words)
    words[1] = _pointer(0, payload_at - 2, 0 | (1 << 16))
    words += [0]  # Payload's pointer
    list_at = len(words)
    words[payload_at] = _pointer(1, list_at - (payload_at + 1), 6 | (len(pieces) << 3))
    words += [0] * len(pieces)
    for i, piece in enumerate(pieces):
        blob_at = len(words)
        words[list_at + i] = _pointer(1, blob_at - (list_at + i + 1), 2 | (len(piece) << 3))
        padded = piece + bytes(-len(piece) % 8)
        words += list(struct.unpack(f"<{len(padded) // 8}Q", padded))
    if raw_info:
        raw_at = len(words)
        words[2] = _pointer(0, raw_at - 3, 1 | (1 << 16))
        words += [precision, 0]  # integerPrecision, isSigned false; the shape pointer
        shape_at = len(words)
        words[raw_at + 1] = _pointer(0, shape_at - (raw_at + 2), 0 | (1 << 16))
        words += [0]
        dims_at = len(words)
        words[shape_at] = _pointer(1, dims_at - (shape_at + 1), 4 | (len(shape) << 3))
        packed = struct.pack(f"<{len(shape)}I", *shape) + bytes(-4 * len(shape) % 8)
        words += list(struct.unpack(f"<{len(packed) // 8}Q", packed))
    if type_info:
        type_at = len(words)
        words[3] = _pointer(0, type_at - 4, 1 | (1 << 16))
        words += [0, 0]  # union discriminant 0 (lweCiphertext); its pointer
        lwe_at = len(words)
        words[type_at + 1] = _pointer(0, lwe_at - (type_at + 2), 1)
        words += [0]
    return struct.pack("<II", 0, len(words)) + struct.pack(f"<{len(words)}Q", *words)
