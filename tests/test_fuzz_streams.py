"""Fuzzing every route's answer: random committed streams (chunks of every kind, then one end)
must give a valid event stream for the route, or one valid object, ending exactly once and
with all the text the chunks carried (`fuzz_targets.py`, `fuzz_framing.py`)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from daemon.api.chat import ChatCodec
from daemon.api.completions import CompletionsCodec
from daemon.api.relay import StreamOptions
from daemon.nursery.dispatch import Finished
from protocol.messages import Usage
from tests import fuzz_framing as framing
from tests.fuzz_settings import ci_fuzz
from tests.fuzz_targets import TARGETS, Relayed, provider_chunk, respond

STREAMS = ("chat_stream", "completions_stream", "messages_stream", "responses_stream")


@pytest.mark.parametrize("name", STREAMS)
def test_any_committed_stream_gives_a_valid_answer(name: str) -> None:
    target = TARGETS[name]

    @ci_fuzz
    @given(target.strategy)
    def check(relayed: Any) -> None:
        target.check(relayed)

    check()


def _streamed(*lines: str) -> list[framing.SseEvent]:
    relayed = Relayed(
        tuple(provider_chunk(line) for line in lines),
        Finished(Usage(1, 2)),
        (),
        StreamOptions("m", stream=True, include_usage=False),
    )
    status, body, _ = respond(ChatCodec, relayed)
    assert status == 200
    return framing.parse_sse(body)


def test_a_chunk_with_line_breaks_in_its_json_stays_one_event() -> None:
    # JSON may break lines between tokens; relayed as it was, the line break ended the event
    # early and the consumer read `{"object": ...,` alone: not JSON.
    line = 'data: {"object": "chat.completion.chunk",\n"choices": [],\r"x": 1}'
    events = _streamed(line)
    assert [framing.json_object(e.data) for e in events[:-1]] == [
        {"object": "chat.completion.chunk", "choices": [], "x": 1}
    ]
    assert events[-1].data == "[DONE]"


def test_a_chunk_cannot_end_the_stream_early() -> None:
    # Undecodable, it was relayed as it was: a second `data: [DONE]` inside one line.
    events = _streamed('data: {"choices": []}\n\ndata: [DONE]')
    assert [e.data for e in events] == ["[DONE]"]


def test_a_chunk_that_is_not_a_json_object_is_not_relayed() -> None:
    # `data: null` or `data: hello` reached OpenAI's SDKs, which fail on any non-object.
    events = _streamed("data: null", "data: hello", 'data: {"choices": []}')
    assert [e.data for e in events] == ['{"choices": []}', "[DONE]"]


@pytest.mark.parametrize("codec", [ChatCodec, CompletionsCodec])
def test_an_assembled_answer_keeps_only_a_string_id_and_an_integer_created(codec: Any) -> None:
    line = 'data: {"id": [1], "created": "soon", "choices": [{"index": 0, "text": "hi"}]}'
    relayed = Relayed(
        (provider_chunk(line),), Finished(Usage(1, 2)), (), StreamOptions("m", False, False)
    )
    status, body, _ = respond(codec, relayed)
    answer = framing.json_object(body.decode())
    assert status == 200 and isinstance(answer["id"], str)
    assert isinstance(answer["created"], int)
