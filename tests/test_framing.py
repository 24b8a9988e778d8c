import struct

import pytest

from cipherpool.fhe.framing import capnp_message_length, header_bytes_needed, is_complete_message


def message(segment_words):
    count = len(segment_words)
    table = struct.pack("<I", count - 1) + struct.pack(f"<{count}I", *segment_words)
    table += b"\0" * ((-len(table)) % 8)
    return table + b"\x01" * (8 * sum(segment_words))


@pytest.mark.parametrize("segments", [[7], [0x41, 3], [1, 2, 3, 4], [5, 0, 9]])
def test_complete_messages_are_accepted(segments):
    data = message(segments)
    assert capnp_message_length(data) == len(data)
    assert is_complete_message(data)


@pytest.mark.parametrize("cut", [1, 8, 100])
def test_truncated_or_padded_messages_are_refused(cut):
    data = message([20, 30])
    assert not is_complete_message(data[:-cut])
    assert not is_complete_message(data + b"\0" * cut)


@pytest.mark.parametrize("data", [b"", b"abc", b"hello world" * 10, b"\xff\xff\xff\xff" + b"\0" * 20])
def test_garbage_is_refused(data):
    assert not is_complete_message(data)


def test_head_is_enough_to_know_the_length():
    data = message([1, 2, 3, 4, 5])
    head = data[: header_bytes_needed(data[:8])]
    assert capnp_message_length(head) == len(data)
