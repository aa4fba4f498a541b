"""A provider's chat-completion chunks as Anthropic Messages: stream events, or one message.

`EventStream` turns the chunks into `message_start`, one `ping`, `content_block_start` /
`content_block_delta` / `content_block_stop` per block (`thinking_delta` for reasoning,
`text_delta` for content, `input_json_delta` for each tool call's argument fragments), then
`message_delta` and `message_stop`; or, after a failure, one `error` event. `assembled_message`
maps the `chat.completion` that `CompletionAssembler` built to one `message`. `Stop` reads why
the answer ended.

Usage: `message_start` carries the daemon's prompt estimate (the only number known then);
`message_delta` carries the provider's own counts, which Anthropic's SDK takes as final.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from daemon.api.messages_request import MessagesOptions
from daemon.nursery.attempt import Chunk
from protocol.messages import Usage

STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# A stalled provider is most often an overloaded one; anything else is the server's fault.
IN_BAND_ERROR_TYPES: Final = {
    "timeout": "overloaded_error",
    "server_shutting_down": "overloaded_error",  # retryable, as Anthropic's SDK reads it
}

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()

BlockKey = tuple[str, int]  # ("text" | "thinking", 0) or ("tool_use", the call's index)


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: `event: TYPE` and its JSON."""
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def message_id(request_id: str) -> str:
    return "msg_" + request_id.replace("-", "")


@dataclass
class Stop:
    """Why the answer ended, as its chunks said."""

    stop_sequences: tuple[str, ...]
    finish_reason: str | None = None
    matched: str | None = None

    def observe(self, chunk: dict[str, Any] | None) -> None:
        for choice in first_choices(chunk):
            finish = choice.get("finish_reason")
            self.finish_reason = finish if isinstance(finish, str) else self.finish_reason
            # vLLM names the stop string it matched; a backend that does not says only "stop".
            matched = choice.get("stop_reason")
            if isinstance(matched, str) and matched in self.stop_sequences:
                self.matched = matched

    def reason(self, used_tools: bool) -> tuple[str, str | None]:
        """`stop_reason` and `stop_sequence`."""
        if self.matched is not None and self.finish_reason in (None, "stop"):
            return "stop_sequence", self.matched
        reason = STOP_REASONS.get(self.finish_reason or "stop", "end_turn")
        # Some backends finish a tool call with "stop": the consumer must still run the tool.
        return ("tool_use" if used_tools and reason == "end_turn" else reason), None


def first_choices(chunk: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The first choice of a chunk (the daemon never asks for `n` > 1)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            yield choice


class EventStream:
    """The stream events of one answer; each method returns the bytes to write.

    One block is open at a time, as Anthropic streams them. A backend that interleaves the
    argument fragments of parallel tool calls (none of the common ones does) gets each
    fragment sent to its own call's block, which Anthropic's SDK assembles by index.
    """

    def __init__(self, options: MessagesOptions, message_id: str) -> None:
        self._options = options
        self._id = message_id
        self._stop = Stop(options.stop_sequences)
        self._blocks = 0
        self._open: BlockKey | None = None
        self._tools: dict[int, int] = {}  # a tool call's index -> its block's index

    def opening(self) -> bytes:
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._options.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._options.input_tokens, "output_tokens": 0},
        }
        start = event("message_start", {"type": "message_start", "message": message})
        return start + event("ping", {"type": "ping"})

    def chunk(self, relayed: Chunk) -> bytes:
        chunk = relayed.event
        self._stop.observe(chunk)
        out: list[bytes] = []
        for choice in first_choices(chunk):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
        return b"".join(out)

    def finish(self, usage: Usage) -> bytes:
        out: list[bytes] = []
        self._close(out)
        reason, sequence = self._stop.reason(used_tools=bool(self._tools))
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
            },
        }
        out += [event("message_delta", delta), event("message_stop", {"type": "message_stop"})]
        return b"".join(out)

    def fail(self, kind: str, message: str) -> bytes:
        error = {"type": IN_BAND_ERROR_TYPES.get(kind, "api_error"), "message": message}
        return event("error", {"type": "error", "error": error})

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            block = {"type": "thinking", "thinking": "", "signature": ""}
            index = self._into(("thinking", 0), block, out)
            out.append(_block_delta(index, {"type": "thinking_delta", "thinking": reasoning}))
        content = delta.get("content")
        if isinstance(content, str) and content:
            index = self._into(("text", 0), {"type": "text", "text": ""}, out)
            out.append(_block_delta(index, {"type": "text_delta", "text": content}))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool_call(call, out)

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index")
        position = position if isinstance(position, int) else 0
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = self._tools.get(position)
        if index is None:
            index = self._into(("tool_use", position), _tool_block(call, function), out)
            self._tools[position] = index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            json_delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(_block_delta(index, json_delta))

    def _into(self, key: BlockKey, block: dict[str, Any], out: list[bytes]) -> int:
        """The index of the open block `key`, closing another and opening it as needed."""
        if self._open != key:
            self._close(out)
            self._open = key
            self._blocks += 1
            start = {"type": "content_block_start", "index": self._blocks - 1}
            out.append(event("content_block_start", {**start, "content_block": block}))
        return self._blocks - 1

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            stop = {"type": "content_block_stop", "index": self._blocks - 1}
            out.append(event("content_block_stop", stop))
            self._open = None


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    data = {"type": "content_block_delta", "index": index, "delta": delta}
    return event("content_block_delta", data)


def _tool_block(call: dict[str, Any], function: dict[str, Any]) -> dict[str, Any]:
    call_id = call.get("id")
    name = function.get("name")
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) and call_id else _tool_use_id(),
        "name": name if isinstance(name, str) else "",
        "input": {},
    }


def _tool_use_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def assembled_message(
    completion: dict[str, Any], stop: Stop, options: MessagesOptions, message_id: str, usage: Usage
) -> dict[str, Any]:
    """The `message` for a `chat.completion` assembled from the chunks."""
    message = completion["choices"][0]["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        thinking = message["reasoning_content"]
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    content += [_tool_use(call) for call in calls]
    reason, sequence = stop.reason(used_tools=bool(calls))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": options.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
    }


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {
        "type": "tool_use",
        "id": call.get("id") or _tool_use_id(),
        "name": function["name"],
        "input": _tool_input(function["arguments"]),
    }


def _tool_input(arguments: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = _decoder.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        value = None
    # Arguments that are not a JSON object are still the model's answer: kept, not dropped.
    return value if isinstance(value, dict) else {"arguments": arguments}
