"""The Responses API's output objects: the `response` envelope, its output items, its usage.

The stream (`responses_stream.py`) and the assembled answer (`responses.py`) both build them
here, so a streamed `response.completed` carries the very object a non-streaming request gets.
The shapes are those the official SDK's types declare (`openai.types.responses`), which its
stream helper checks item by item.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from daemon.api.responses_request import ResponsesOptions
from protocol.messages import Usage

# Why a backend stopped, as the Responses API says it: `incomplete_details.reason`.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class Frame:
    """What every `response` object of one answer shares."""

    id: str
    created_at: int
    options: ResponsesOptions

    @classmethod
    def open(cls, request_id: str, options: ResponsesOptions) -> Frame:
        # The provider request's id, so an operator can match a response to the daemon's logs.
        return cls(f"resp_{request_id.replace('-', '')}", int(time.time()), options)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        reason = INCOMPLETE_REASONS.get(finish_reason or "") if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": None if reason is None else {"reason": reason},
            "model": self.options.model,
            "output": output,
            "usage": usage,
            **self.options.echo,
        }


def final_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason in INCOMPLETE_REASONS else "completed"


def usage_object(chat_usage: dict[str, Any] | None, usage: Usage) -> dict[str, Any]:
    """The backend's usage chunk when it sent one, else the provider's `inference_complete`."""
    reported = usage.reasoning_tokens or 0
    if not isinstance(chat_usage, dict):
        return _usage(usage.prompt_tokens, usage.completion_tokens, reported, cached=0)
    details = _object(chat_usage.get("completion_tokens_details"))
    return _usage(
        _count(chat_usage.get("prompt_tokens")),
        _count(chat_usage.get("completion_tokens")),
        _count(details.get("reasoning_tokens")) or reported,
        cached=_count(_object(chat_usage.get("prompt_tokens_details")).get("cached_tokens")),
    )


def _usage(prompt: int, completion: int, reasoning: int, *, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# Output items ----------------------------------------------------------------------------------


def text_part(kind: str, text: str) -> dict[str, Any]:
    """An `output_text` part of a message, or a `reasoning_text` part of a reasoning item."""
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}


def text_item(kind: str, id_: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    """A `message` item (the answer) or a `reasoning` item (the backend's thinking)."""
    if kind == "message":
        return {"id": id_, "type": kind, "status": status, "role": "assistant", "content": parts}
    return {"id": id_, "type": kind, "status": status, "summary": [], "content": parts}


def call_item(id_: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def from_completion(
    frame: Frame, completion: dict[str, Any], usage: dict[str, Any]
) -> dict[str, Any]:
    """One assembled `chat.completion` as one `response`."""
    (choice,) = completion["choices"]
    message, finish_reason = choice["message"], choice["finish_reason"]
    status = final_status(finish_reason)
    output = []
    if message.get("reasoning_content"):
        part = text_part("reasoning", message["reasoning_content"])
        output.append(text_item("reasoning", new_id("rs"), [part], "completed"))
    if message.get("content"):
        part = text_part("message", message["content"])
        output.append(text_item("message", new_id("msg"), [part], status))
    for call in message.get("tool_calls", ()):
        function = call["function"]
        call_id = call["id"] or new_id("call")
        output.append(
            call_item(new_id("fc"), call_id, function["name"], function["arguments"], status)
        )
    return frame.response(status, output, usage=usage, finish_reason=finish_reason)
