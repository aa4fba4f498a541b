"""Assemble a non-streaming `chat.completion` from the chunks of a provider's stream.

Providers always stream; a consumer that asked for one answer gets the content, reasoning and
tool calls accumulated (tool calls by index, arguments concatenated), the finish reason and
the usage. The `text` of `/v1/completions` chunks accumulates as content too, and their
`logprobs` lists are concatenated key by key, for the text-completions route to answer with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Usage


@dataclass
class _ToolCall:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def merge(self, delta: dict[str, Any]) -> None:
        self.id = _text(delta.get("id")) or self.id
        self.type = _text(delta.get("type")) or self.type
        function = delta.get("function")
        if not isinstance(function, dict):
            return  # a provider's malformed delta must not turn the answer into a 500
        name = function.get("name")
        self.name += name if isinstance(name, str) else ""
        _append(self.arguments, function.get("arguments"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


@dataclass
class CompletionAssembler:
    model: str
    id: str | None = None
    created: int | None = None
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    logprobs: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, event: dict[str, Any] | None) -> None:
        if not event:
            return
        self.id = self.id or _text(event.get("id"))
        created = event.get("created")
        if self.created is None and isinstance(created, int) and not isinstance(created, bool):
            self.created = created
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        self.finish_reason = finish_reason_of(choice) or self.finish_reason
        _append(self.content, choice.get("text"))
        self._add_logprobs(choice.get("logprobs"))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        _append(self.content, delta.get("content"))
        _append(self.reasoning, delta.get("reasoning_content") or delta.get("reasoning"))
        _append(self.refusal, delta.get("refusal"))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                index = call.get("index")
                index = index if isinstance(index, int) else 0
                self.tool_calls.setdefault(index, _ToolCall()).merge(call)

    def _add_logprobs(self, logprobs: Any) -> None:
        for key, values in logprobs.items() if isinstance(logprobs, dict) else ():
            if isinstance(values, list):
                self.logprobs.setdefault(key, []).extend(values)

    def result(self, usage: Usage | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].as_dict() for i in sorted(self.tool_calls)]
        return {
            "id": self.id or "chatcmpl-dinfer",
            "object": "chat.completion",
            "created": self.created or int(time.time()),
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": self.finish_reason or "stop"}
            ],
            "usage": self._usage(usage),
        }

    def _usage(self, usage: Usage | None) -> dict[str, Any]:
        if self.usage is not None:
            return self.usage
        if usage is None:
            return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        total = usage.prompt_tokens + usage.completion_tokens
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": total,
        }


def finish_reason_of(choice: dict[str, Any]) -> str | None:
    """A choice's `finish_reason`: a provider's non-string one is no reason (and would crash a
    route that looks it up)."""
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) and reason else None


def _text(value: Any) -> str | None:
    """A provider's string field; any other type is as if it were absent (the answer's shape
    is the route's promise, whatever a provider sent)."""
    return value if isinstance(value, str) and value else None


def _append(parts: list[str], value: Any) -> None:
    if isinstance(value, str) and value:
        parts.append(value)
