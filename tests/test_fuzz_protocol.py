"""Fuzzing the protocol layer: frames, SSE chunks, tool-schema repair, the node's request.

Each property is a target of `fuzz_targets.py` under the CI budget (`fuzz_settings.py`); the
named tests below are the defects the fuzzing found, kept as regressions.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given

from protocol.messages import ProtocolError, decode_daemon_frame, decode_provider_frame
from protocol.sse import ChunkKind, classify
from tests.fuzz_settings import ci_fuzz
from tests.fuzz_targets import TARGETS


@ci_fuzz
@given(TARGETS["frames"].strategy)
def test_any_frame_decodes_to_a_message_or_a_protocol_error(frame: Any) -> None:
    TARGETS["frames"].check(frame)


@ci_fuzz
@given(TARGETS["sse"].strategy)
def test_any_line_classifies_without_raising(line: Any) -> None:
    TARGETS["sse"].check(line)


@ci_fuzz
@given(TARGETS["toolschema"].strategy)
def test_any_body_repairs_to_a_stable_body(body: Any) -> None:
    TARGETS["toolschema"].check(body)


@ci_fuzz
@given(TARGETS["provider_prepare"].strategy)
def test_any_plaintext_is_a_request_or_a_400_on_the_node(plaintext: Any) -> None:
    TARGETS["provider_prepare"].check(plaintext)


def test_a_text_frame_with_a_lone_surrogate_is_a_protocol_error() -> None:
    # A `str` can hold what no UTF-8 frame can; msgspec raised UnicodeEncodeError for it.
    frame = '{"type": "heartbeat", "active_requests": 0, "status": "\ud800"}'
    for decode in (decode_provider_frame, decode_daemon_frame):
        decoded = decode(frame)
        assert isinstance(decoded, ProtocolError)
        assert "UTF-8" in decoded.reason


def test_a_payload_with_a_lone_surrogate_is_opaque_content() -> None:
    assert classify('{"choices": "\ud800"}') == (ChunkKind.CONTENT, None)
