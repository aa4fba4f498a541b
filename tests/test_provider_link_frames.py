"""The node's own WebSocket framing (`provider.link.masked_text_frames`) read back by wsproto.

The daemon reads these frames with wsproto's server side; each must come out as the text
message it was, whatever its size class (7-bit, 16-bit and 64-bit lengths), masked.
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from provider.link import masked_text_frames


def test_frames_of_every_length_class_read_back_as_their_messages() -> None:
    messages = ["", "a", "é" * 62, "x" * 125, "y" * 126, "z" * 65535, "w" * 65536, '{"k": 1}']
    server = Connection(ConnectionType.SERVER)
    server.receive_data(masked_text_frames(messages))
    events = list(server.events())
    assert all(isinstance(event, TextMessage) and event.message_finished for event in events)
    assert [event.data for event in events] == messages  # type: ignore[attr-defined]


def test_every_frame_is_masked_with_its_own_key() -> None:
    data = masked_text_frames(["abcd", "abcd"])
    first, second = data[:10], data[10:]
    assert first[1] & 0x80 and second[1] & 0x80
    assert first[6:] != b"abcd" and second[6:] != b"abcd"
