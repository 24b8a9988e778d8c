"""Structural check of Cap'n Proto messages before concrete deserializes them.

Concrete serializes evaluation keys and ciphertexts as single Cap'n Proto messages. Measured
here: `EvaluationKeys.deserialize` on a *truncated* key never returns (it loops on "Premature
EOF"), which would wedge a pool node. The segment table at the head of a message states the
exact length, so a truncated or padded blob is refused before concrete ever sees it.
"""

from __future__ import annotations

import struct

MAX_SEGMENTS = 512  # Cap'n Proto's own reader refuses more
WORD = 8


def header_bytes_needed(data: bytes) -> int:
    """How many leading bytes hold the segment table (read the first 4 to know)."""
    if len(data) < 4:
        return 8
    count: int = struct.unpack_from("<I", data, 0)[0] + 1
    return 4 + 4 * min(count, MAX_SEGMENTS + 1)


def capnp_message_length(data: bytes) -> int | None:
    """Length the segment table announces, or None when there is no valid table.

    Only the segment table is read, so ``data`` may be just the head of a message."""
    if len(data) < 8:
        return None
    count: int = struct.unpack_from("<I", data, 0)[0] + 1
    if count > MAX_SEGMENTS:
        return None
    table = 4 + 4 * count
    if len(data) < table:
        return None
    header = table + (-table) % WORD
    sizes: tuple[int, ...] = struct.unpack_from(f"<{count}I", data, 4)
    return header + WORD * sum(sizes)


def is_complete_message(data: bytes) -> bool:
    return capnp_message_length(data) == len(data)
