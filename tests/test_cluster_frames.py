"""The cluster link's framing (daemon/cluster/peerlink.py): what one instance writes, the
other splits back into the same messages, however the bytes arrive."""

from __future__ import annotations

import pytest

from daemon.cluster.peerlink import MAX_FRAME, FrameError, encode_frame, split_frames

MESSAGES = [
    ("frame", "req-1", b'{ "type" : "inference_response_chunk" }'),
    ("gone", "req-2", b""),
    ("ping", "", b""),
    ("dispatch", "r\u00e9q", bytes(range(256)) * 40),
]


def test_frames_split_back_into_their_messages_byte_by_byte() -> None:
    wire = b"".join(encode_frame(*m) for m in MESSAGES)
    buffer, seen = bytearray(), []
    for byte in wire:  # the worst case: one byte per receive
        buffer.append(byte)
        frames, used = split_frames(buffer)
        del buffer[:used]
        seen.extend(frames)
    assert seen == MESSAGES
    assert buffer == bytearray()


def test_a_frame_of_a_bad_length_is_refused() -> None:
    too_long = bytearray((MAX_FRAME + 1).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(FrameError):
        split_frames(too_long)
    shorter_than_its_names = bytearray((2).to_bytes(4, "big") + b"\x05\x05")
    with pytest.raises(FrameError):
        split_frames(shorter_than_its_names)
