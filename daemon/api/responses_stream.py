"""One streamed response: chat-completion chunks in, Responses API events out.

Each chunk's delta opens, extends or closes output items: reasoning text (`reasoning_content`
or `reasoning`) is a `reasoning` item, content is a `message` item, and each tool call (by its
`index`) is a `function_call` item. A message or reasoning item ends when the other kind of
text, or a tool call, begins: that is the order the backend wrote them in. Tool calls stay open
to the end, since backends interleave the argument fragments of parallel calls. Every event
is `event: TYPE` and `data: JSON` carrying a `sequence_number` counted from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec

from daemon.api.assemble import finish_reason_of
from daemon.api.responses_output import (
    Frame,
    call_item,
    final_status,
    new_id,
    text_item,
    text_part,
    usage_object,
)
from daemon.nursery.attempt import Chunk
from protocol.messages import Usage

Event = dict[str, Any]
T = TypeVar("T")

_encoder: Final = msgspec.json.Encoder(decimal_format="number")
# The daemon's in-band failure kinds keep their name in `error.type`; `error.code` is the one
# of the SDK's codes that fits a failure of the server side.
FAILED_CODE: Final = "server_error"


@dataclass
class _TextItem:
    """A `message` or `reasoning` item being written."""

    kind: str  # "message" or "reasoning"
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    status: str = "in_progress"

    @property
    def _delta_type(self) -> str:
        return "response.output_text" if self.kind == "message" else "response.reasoning_text"

    def item(self) -> dict[str, Any]:
        parts = [] if self.status == "in_progress" else [self._part()]
        return text_item(self.kind, self.id, parts, self.status)

    def _part(self) -> dict[str, Any]:
        return text_part(self.kind, "".join(self.text))

    def _where(self) -> Event:
        return {"item_id": self.id, "output_index": self.index, "content_index": 0}

    def _logprobs(self) -> Event:
        # The SDK's text events require `logprobs`; backends' chat chunks carry none we relay.
        return {"logprobs": []} if self.kind == "message" else {}

    def opened(self) -> list[Event]:
        added = {"type": "response.output_item.added", "output_index": self.index}
        part = {"type": "response.content_part.added", **self._where()}
        return [{**added, "item": self.item()}, {**part, "part": text_part(self.kind, "")}]

    def delta(self, text: str) -> list[Event]:
        self.text.append(text)
        delta = {"type": f"{self._delta_type}.delta", **self._where(), "delta": text}
        return [{**delta, **self._logprobs()}]

    def close(self, status: str) -> list[Event]:
        self.status = status
        done = {"type": f"{self._delta_type}.done", **self._where(), "text": "".join(self.text)}
        return [
            {**done, **self._logprobs()},
            {"type": "response.content_part.done", **self._where(), "part": self._part()},
            {"type": "response.output_item.done", "output_index": self.index, "item": self.item()},
        ]


@dataclass
class _CallItem:
    """A `function_call` item being written."""

    index: int
    id: str
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    status: str = "in_progress"

    def item(self) -> dict[str, Any]:
        return call_item(self.id, self.call_id, self.name, "".join(self.arguments), self.status)

    def opened(self) -> list[Event]:
        added = {"type": "response.output_item.added", "output_index": self.index}
        return [{**added, "item": self.item()}]

    def delta(self, fragment: str) -> list[Event]:
        self.arguments.append(fragment)
        where = {"item_id": self.id, "output_index": self.index}
        return [{"type": "response.function_call_arguments.delta", **where, "delta": fragment}]

    def close(self, status: str) -> list[Event]:
        self.status = status
        where = {"item_id": self.id, "output_index": self.index}
        arguments = "".join(self.arguments)
        return [
            {"type": "response.function_call_arguments.done", **where, "arguments": arguments},
            {"type": "response.output_item.done", "output_index": self.index, "item": self.item()},
        ]


class ResponseEvents:
    """The events of one streamed response, each method returning them encoded."""

    def __init__(self, frame: Frame) -> None:
        self._frame = frame
        self._sequence = 0
        self._output: list[_TextItem | _CallItem] = []
        self._text: _TextItem | None = None  # the open message or reasoning item
        self._calls: dict[int, _CallItem] = {}  # by the backend's tool-call index
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def opening(self) -> bytes:
        response = self._frame.response("in_progress", [])
        return self._encode(
            [
                {"type": "response.created", "response": response},
                {"type": "response.in_progress", "response": response},
            ]
        )

    def chunk(self, relayed: Chunk) -> bytes:
        chunk = relayed.event
        if not chunk:
            return b""
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return b""
        self._finish_reason = finish_reason_of(choice) or self._finish_reason
        delta = choice.get("delta")
        return self._encode(self._delta(delta)) if isinstance(delta, dict) else b""

    def finish(self, usage: Usage) -> bytes:
        """Close every open item; `response.completed`, or `response.incomplete` on a length
        (or content-filter) stop."""
        status = final_status(self._finish_reason)
        events = self._close_text(status)
        for call in self._calls.values():
            events += call.close(status)
        response = self._frame.response(
            status,
            [item.item() for item in self._output],
            usage=usage_object(self._usage, usage),
            finish_reason=self._finish_reason,
        )
        return self._encode([*events, {"type": f"response.{status}", "response": response}])

    def fail(self, kind: str, message: str) -> bytes:
        """`response.failed`: what was written so far, cut short."""
        for item in self._output:
            if item.status == "in_progress":
                item.status = "incomplete"
        error = {"code": FAILED_CODE, "type": kind, "message": message}
        output = [item.item() for item in self._output]
        response = self._frame.response("failed", output, error=error)
        return self._encode([{"type": "response.failed", "response": response}])

    def _delta(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events += self._text_delta("reasoning", reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            events += self._text_delta("message", content)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                events += self._call_delta(call)
        return events

    def _text_delta(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._text is None or self._text.kind != kind:
            events += self._close_text("completed")
            prefix = "msg" if kind == "message" else "rs"
            self._text = _TextItem(kind, len(self._output), new_id(prefix))
            self._output.append(self._text)
            events += self._text.opened()
        return events + self._text.delta(text)

    def _call_delta(self, fragment: dict[str, Any]) -> list[Event]:
        events = self._close_text("completed")
        index = _typed(fragment, "index", int) or 0
        function = _typed(fragment, "function", dict) or {}
        name = _typed(function, "name", str)
        call = self._calls.get(index)
        if call is None:
            call_id = _typed(fragment, "id", str) or new_id("call")
            call = _CallItem(len(self._output), new_id("fc"), call_id, name or "")
            self._calls[index] = call
            self._output.append(call)
            events += call.opened()
        elif name:
            call.name += name  # a name sent in pieces, as the chat assembler reads it too
        arguments = _typed(function, "arguments", str)
        if arguments:
            events += call.delta(arguments)
        return events

    def _close_text(self, status: str) -> list[Event]:
        text, self._text = self._text, None
        return text.close(status) if text is not None else []

    def _encode(self, events: list[Event]) -> bytes:
        parts = []
        for event in events:
            event["sequence_number"] = self._sequence
            self._sequence += 1
            data = _encoder.encode(event)
            parts.append(b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n")
        return b"".join(parts)


def _typed(mapping: dict[str, Any], key: str, kind: type[T]) -> T | None:
    value = mapping.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None
