"""Server-sent-event chunks as providers relay them (PROTOCOL.md §6).

Owns two things: pulling the payload out of a `data:` line, and deciding whether a payload is
boilerplate (held, never commits a request), content (commits it), an in-band error, or the
`[DONE]` marker. Classification parses the JSON once and hands the parsed object back, so the
daemon never decodes a chunk twice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

_DATA_PREFIX = "data:"
_DONE = "[DONE]"
_DONE_BYTES = b"[DONE]"
# A tuple, not a set: `in` then compares with ==, so an unhashable `type` value cannot raise.
_BOILERPLATE_TYPES = ("response.created", "response.in_progress")
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
# Every key a boilerplate delta may carry. Anything else, even with a null value, falls outside
# the rule's "otherwise only ..." and is content: committing early is the safe mistake, holding
# real output is not.
_VACUOUS_DELTA_KEYS = frozenset({"role", "tool_calls", *_TEXT_FIELDS})

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()


class ChunkKind(enum.Enum):
    BOILERPLATE = "boilerplate"
    CONTENT = "content"
    ERROR = "error"
    DONE = "done"


class Classified(NamedTuple):
    """A chunk's kind and its parsed JSON object (None for `[DONE]` or a non-object)."""

    kind: ChunkKind
    event: dict[str, Any] | None


_DONE_CHUNK = Classified(ChunkKind.DONE, None)
_OPAQUE_CONTENT = Classified(ChunkKind.CONTENT, None)


def parse_data_line(line: str) -> str | None:
    """The payload of an SSE `data:` line, or None for any other line (blank, comment, event)."""
    if not line.startswith(_DATA_PREFIX):
        return None
    payload = line[len(_DATA_PREFIX) :]
    if payload.endswith("\n"):
        payload = payload[:-2] if payload.endswith("\r\n") else payload[:-1]
    elif payload.endswith("\r"):
        payload = payload[:-1]
    return payload[1:] if payload.startswith(" ") else payload


def classify_line(line: str) -> Classified | None:
    """Classify a full `data: ...` line; None for lines that carry no data (nothing to relay)."""
    payload = parse_data_line(line)
    return None if payload is None else classify(payload)


def classify(payload: str | bytes) -> Classified:
    """Boilerplate, content, error or done, per PROTOCOL.md §6. Never raises."""
    if _is_done(payload):
        return _DONE_CHUNK
    try:
        event = _decoder.decode(payload)
    # RecursionError is msgspec's answer to very deep nesting; UnicodeEncodeError to a `str`
    # holding a lone surrogate.
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        # Text we cannot parse is still output the backend produced: it commits.
        return _OPAQUE_CONTENT
    if not isinstance(event, dict):
        return _OPAQUE_CONTENT
    return Classified(_kind_of(event), event)


def _is_done(payload: str | bytes) -> bool:
    if isinstance(payload, bytes):
        return payload.strip() == _DONE_BYTES
    return payload.strip() == _DONE


def _kind_of(event: dict[str, Any]) -> ChunkKind:
    if "error" in event:
        return ChunkKind.ERROR
    if event.get("type") in _BOILERPLATE_TYPES:
        return ChunkKind.BOILERPLATE
    if _is_boilerplate_chunk(event):
        return ChunkKind.BOILERPLATE
    return ChunkKind.CONTENT


def _is_boilerplate_chunk(event: dict[str, Any]) -> bool:
    kind = event.get("object")
    # Only a string is looked up: an unhashable `object` value must not raise.
    vacuous = _VACUOUS_CHOICE.get(kind) if isinstance(kind, str) else None
    if vacuous is None or event.get("usage") is not None:
        return False
    choices = event.get("choices")
    if not isinstance(choices, list):
        return False
    # An empty `choices` list passes ("every choice" holds vacuously): without usage such a
    # chunk carries nothing a consumer could see. With usage it was rejected above.
    return all(vacuous(choice) for choice in choices)


def _is_vacuous_choice(choice: Any) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return False
    delta = choice.get("delta")
    # The rule requires a `role`: a delta without one (even `{}`) is content.
    if not isinstance(delta, dict) or not isinstance(delta.get("role"), str):
        return False
    return delta.keys() <= _VACUOUS_DELTA_KEYS and _delta_is_empty(delta)


def _delta_is_empty(delta: dict[str, Any]) -> bool:
    for field in _TEXT_FIELDS:
        if delta.get(field) not in (None, ""):
            return False
    return delta.get("tool_calls") in (None, [])


def _is_vacuous_text_choice(choice: Any) -> bool:
    """A `/v1/completions` choice with no text yet. Logprobs, even for an empty token, are
    something a consumer asked to see: such a choice is content."""
    return (
        isinstance(choice, dict)
        and choice.get("finish_reason") is None
        and choice.get("text") in (None, "")
        and choice.get("logprobs") is None
    )


# The boilerplate rule of each chunk type that has one, by the chunk's `object`.
_VACUOUS_CHOICE: dict[str, Callable[[Any], bool]] = {
    "chat.completion.chunk": _is_vacuous_choice,
    "text_completion": _is_vacuous_text_choice,
}
