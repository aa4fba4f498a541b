"""The rule that decides whether a backend stream succeeded, and the usage it reports.

**A stream succeeded only if a `finish_reason` arrived.** Backends break off in ways that look
like a normal end: llama-cpp-python's server answers 200 with an empty body when its template
raises and ends an interrupted stream with `[DONE]` but no finish reason; Ollama ends with an
empty chunk and EOF. Any of those is a 502, never an `inference_complete`.

Usage: the backend's own usage chunk when it sent one; otherwise completion tokens are counted
as the deltas that carried output (llama.cpp's servers stream one token per delta) and prompt
tokens are estimated as characters / 4, so a stream that produced content never reports zero
tokens. An estimated prompt count is marked `estimated`; the request then asks the backend's
tokenizer for the real one (`provider.tokenizer.counted`).
"""

from __future__ import annotations

from typing import Any, Final

from protocol.messages import Usage
from provider.failures import RequestFailure

CHARS_PER_TOKEN: Final = 4
_OUTPUT_FIELDS: Final = ("content", "reasoning_content", "reasoning", "refusal", "tool_calls")


class StreamAccount:
    """Watches the events of one stream; `outcome()` gives its usage or its failure."""

    def __init__(self, prompt_chars: int) -> None:
        self._prompt_chars = prompt_chars
        self._data_lines = 0
        self._output_deltas = 0
        self._finished = False
        self._usage: Usage | None = None

    def observe(self, event: dict[str, Any] | None) -> None:
        """One relayed (content or boilerplate) event; None for an unparsable one."""
        self._data_lines += 1
        if event is None:
            self._output_deltas += 1  # opaque text is still output the consumer sees
            return
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            self._observe_choice(choice)
        usage = _usage(event.get("usage"))
        if usage is not None:
            self._usage = usage

    @property
    def produced_output(self) -> bool:
        """Whether any event carried output (content, reasoning, tool calls, text)."""
        return self._output_deltas > 0

    def outcome(self) -> Usage:
        """The usage to report; raises RequestFailure(502) if the stream never finished."""
        if not self._finished:
            raise self._incomplete()
        return self._reported_usage()

    def _observe_choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        if choice.get("finish_reason") is not None:
            self._finished = True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(f) for f in _OUTPUT_FIELDS):
            self._output_deltas += 1
        elif choice.get("text"):  # /v1/completions chunks carry `text`, not a delta
            self._output_deltas += 1

    def _incomplete(self) -> RequestFailure:
        if self._data_lines == 0:
            return RequestFailure(502, "backend sent no events (empty response)", "empty_response")
        return RequestFailure(
            502, "backend stream ended without a finish_reason", "incomplete_stream"
        )

    def _reported_usage(self) -> Usage:
        usage = self._usage or Usage(0, 0)
        if usage.completion_tokens == 0 and self._output_deltas > 0:
            usage = Usage(usage.prompt_tokens, self._output_deltas)
        if usage.prompt_tokens > 0 or self._prompt_chars == 0:
            return usage
        estimate = estimated_tokens(self._prompt_chars)
        return Usage(estimate, usage.completion_tokens, usage.reasoning_tokens, estimated=True)


def estimated_tokens(chars: int) -> int:
    """Characters / 4, rounded up: 1 character is 1 token."""
    return -(-chars // CHARS_PER_TOKEN)


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt = _count(value.get("prompt_tokens"))
    completion = _count(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    details = value.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=reasoning)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
