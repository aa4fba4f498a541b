"""A consumer's `/v1/chat/completions` body: validation, routing traits, the provider envelope.

`parse_chat_request` turns raw bytes into a `ChatRequest` or raises `BadRequest` naming the
field. Tool schemas are repaired first (`protocol.toolschema`), so every provider gets the
normalized body; numbers survive exactly (decimals are decoded as `Decimal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec

from daemon.routing.types import RequestTraits
from protocol.toolschema import normalize_tools

ENDPOINT: Final = "/v1/chat/completions"
MEDIA_PART_TYPES: Final = frozenset(
    {"image_url", "input_image", "image", "video_url", "input_video", "video"}
)
TOKENS_PER_MEDIA_PART: Final = 300
TOKENS_PER_MESSAGE: Final = 4
DEFAULT_MAX_TOKENS: Final = 1024

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)
_encoder: Final = msgspec.json.Encoder(decimal_format="number")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    traits: RequestTraits
    stream: bool
    include_usage: bool
    envelope: bytes  # {"endpoint": ..., "body": ...}: the plaintext sealed for each provider


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = _decode(normalize_tools(raw))
    model = _require(body, "model", str, "a string")
    messages = _require(body, "messages", list, "an array")
    if not messages:
        raise BadRequest("'messages' must not be empty", "messages")
    if not all(isinstance(message, dict) for message in messages):
        raise BadRequest("every entry of 'messages' must be an object", "messages")
    _check_options(body)
    stream = body.get("stream") is True
    include_usage = stream and _include_usage(body)
    traits = RequestTraits(
        model=model,
        has_tools=bool(body.get("tools")),
        has_media=any(_media_parts(m) for m in messages),
        prompt_tokens=estimate_prompt_tokens(messages),
        max_tokens=_max_tokens(body),
    )
    provider_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    envelope = _encoder.encode({"endpoint": ENDPOINT, "body": provider_body})
    return ChatRequest(traits, stream, include_usage, envelope)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nesting too deep
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _require(body: dict[str, Any], name: str, kind: type, described: str) -> Any:
    if name not in body:
        raise BadRequest(f"missing required field '{name}'", name)
    value = body[name]
    if not isinstance(value, kind) or (kind is str and not value):
        raise BadRequest(f"'{name}' must be {described}", name)
    return value


def _check_options(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise BadRequest("'n' must be a positive integer", "n")
    if n is not None and n > 1:
        raise BadRequest("'n' greater than 1 is not supported", "n")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", "tools")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise BadRequest(f"'{name}' must be a positive integer", name)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else DEFAULT_MAX_TOKENS


def _media_parts(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return 0
    return sum(
        1 for part in content if isinstance(part, dict) and part.get("type") in MEDIA_PART_TYPES
    )


def estimate_prompt_tokens(messages: list[Any]) -> int:
    """Text length / 4, plus 4 per message, plus 300 per image or video part."""
    chars = sum(_text_length(m) for m in messages)
    media = sum(_media_parts(m) for m in messages)
    return chars // 4 + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_MEDIA_PART * media


def _text_length(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0
