"""A consumer's reading of an event stream, and each route's framing rules, for the fuzz targets.

`parse_sse` reads bytes the way the WHATWG EventSource parser (and the OpenAI and Anthropic
SDKs) do: lines end at CR, LF or CRLF; `data:` lines of one event join with LF; a blank line
dispatches. The `check_*` functions assert what a route's stream must look like whatever the
provider sent; each failure says which rule broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

_LINES = re.compile(r"\r\n|\r|\n")
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class SseEvent:
    type: str | None  # the `event:` field, None when absent
    data: str


def parse_sse(body: bytes) -> list[SseEvent]:
    """Every event of `body`; the stream must end at an event's end (nothing left dangling)."""
    text = body.decode()  # a UnicodeDecodeError is a failure too: the stream must be UTF-8
    events: list[SseEvent] = []
    kind: str | None = None
    data: list[str] | None = None
    lines = _LINES.split(text)
    assert lines[-1] == "", f"the stream ends inside a line: {lines[-1][:80]!r}"
    for line in lines[:-1]:
        if not line:
            if data is not None:
                events.append(SseEvent(kind, "\n".join(data)))
            kind, data = None, None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data = [*(data or []), value]
    assert data is None and kind is None, "the stream ends inside an event"
    return events


def json_object(data: str) -> dict[str, Any]:
    value = _decoder.decode(data)
    assert isinstance(value, dict), f"event data is not a JSON object: {data[:80]!r}"
    return value


def check_openai(events: list[SseEvent], failed: bool) -> list[dict[str, Any]]:
    """`data: {...}` events, then `data: [DONE]` exactly once, last; the chunk objects."""
    assert events, "empty stream"
    assert events[-1].data == "[DONE]", "the stream does not end with [DONE]"
    objects = []
    for event in events[:-1]:
        assert event.type is None, f"unexpected event type {event.type!r}"
        assert event.data != "[DONE]", "[DONE] before the end"
        objects.append(json_object(event.data))
    if failed:
        assert objects and set(objects[-1]) == {"error"}, "a failure without its error event"
    return objects


def check_responses(events: list[SseEvent], failed: bool) -> list[dict[str, Any]]:
    """Typed events numbered from 0, created and in_progress first, exactly one terminal
    event, last; output items opened and closed in order."""
    decoded = []
    for number, event in enumerate(events):
        data = json_object(event.data)
        assert data.get("type") == event.type, f"event {event.type!r} carries {data.get('type')!r}"
        assert data.get("sequence_number") == number, f"sequence_number at {number}"
        decoded.append(data)
    kinds = [data["type"] for data in decoded]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds[:2]
    terminal = ("response.completed", "response.incomplete", "response.failed")
    ends = [kind for kind in kinds if kind in terminal]
    assert len(ends) == 1 and kinds[-1] == ends[0], f"terminal events {ends}"
    assert (kinds[-1] == "response.failed") == failed, kinds[-1]
    _check_items(decoded[2:-1], decoded[-1]["response"], failed)
    return decoded


def _check_items(events: list[dict[str, Any]], response: dict[str, Any], failed: bool) -> None:
    opened: dict[int, str] = {}  # output index -> item id
    done: set[int] = set()
    for event in events:
        index = event.get("output_index")
        assert isinstance(index, int), f"{event['type']} without output_index"
        if event["type"] == "response.output_item.added":
            assert index == len(opened), f"item {index} added out of order"
            opened[index] = event["item"]["id"]
            continue
        assert index in opened and index not in done, f"{event['type']} for item {index}"
        if "item_id" in event:
            assert event["item_id"] == opened[index], "item_id does not match its item"
        if event["type"] == "response.output_item.done":
            done.add(index)
    if not failed:
        assert done == set(opened), "items left open at the end"
    output = response["output"]
    assert [item["id"] for item in output] == [opened[i] for i in range(len(opened))]


def check_anthropic(events: list[SseEvent], failed: bool) -> list[dict[str, Any]]:
    """message_start and ping, balanced content blocks, then message_delta and message_stop
    exactly once, or one `error` event at the end after a failure."""
    decoded = []
    for event in events:
        data = json_object(event.data)
        assert data.get("type") == event.type, f"event {event.type!r} carries {data.get('type')!r}"
        decoded.append(data)
    kinds = [data["type"] for data in decoded]
    assert kinds[:2] == ["message_start", "ping"], kinds[:2]
    assert kinds.count("message_start") == 1, "message_start twice"
    if failed:
        assert kinds[-1] == "error" and kinds.count("error") == 1, kinds[-2:]
        assert "message_stop" not in kinds, "message_stop after a failure"
        body = decoded[2:-1]
    else:
        assert kinds[-2:] == ["message_delta", "message_stop"], kinds[-2:]
        assert kinds.count("message_stop") == 1 and kinds.count("message_delta") == 1
        assert "error" not in kinds
        body = decoded[2:-2]
    _check_blocks(body, closed_at_end=not failed)
    return decoded


_DELTA_OF_BLOCK = {
    "text": "text_delta",
    "thinking": "thinking_delta",
    "tool_use": "input_json_delta",
}


def _check_blocks(events: list[dict[str, Any]], closed_at_end: bool) -> None:
    blocks: list[str] = []  # the type of each block started, by index
    open_: int | None = None
    for event in events:
        index = event.get("index")
        match event["type"]:
            case "content_block_start":
                assert open_ is None, f"block {index} starts while {open_} is open"
                assert index == len(blocks), f"block {index} starts out of order"
                blocks.append(event["content_block"]["type"])
                open_ = index
            case "content_block_stop":
                assert index == open_ and index is not None, f"stop of block {index}"
                open_ = None
            case "content_block_delta":
                assert isinstance(index, int) and index < len(blocks), f"delta of block {index}"
                kind = blocks[index]
                assert event["delta"]["type"] == _DELTA_OF_BLOCK[kind], "delta of the wrong type"
                # Only a tool call's fragments may reach a closed block (documented in
                # messages_response.EventStream: interleaved parallel calls).
                assert index == open_ or kind == "tool_use", f"delta of closed block {index}"
            case other:
                raise AssertionError(f"unexpected event {other!r} inside the message")
    if closed_at_end:
        assert open_ is None, "a block left open"
