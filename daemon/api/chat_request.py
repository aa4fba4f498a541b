"""A consumer's `/v1/chat/completions` body: validation, routing traits, the provider envelope.

`parse_chat_request` turns raw bytes into a `ChatRequest` or raises a 400 `ApiError` naming
the field. Tool schemas are repaired first (`protocol.toolschema`), so every provider gets the
normalized body; numbers survive exactly (decimals are decoded as `Decimal`), and the sampling
numbers must lie in the ranges OpenAI documents (`NUMBER_RANGES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec

from daemon.api.errors import ApiError
from daemon.api.handler import Parsed
from daemon.routing.types import RequestTraits
from protocol.toolschema import normalize_tools

ENDPOINT: Final = "/v1/chat/completions"
IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image", "image"})
VIDEO_PART_TYPES: Final = frozenset({"video_url", "input_video", "video"})
MEDIA_PART_TYPES: Final = IMAGE_PART_TYPES | VIDEO_PART_TYPES
# What a vision model's encoder makes of one part, roughly (the seed's figures): counted in the
# first-token deadline, so a request with a video does not lean on the preamble extension.
TOKENS_PER_IMAGE: Final = 300
TOKENS_PER_VIDEO: Final = 1500
TOKENS_PER_MESSAGE: Final = 4
DEFAULT_MAX_TOKENS: Final = 1024

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)
_encoder: Final = msgspec.json.Encoder(decimal_format="number")


# The largest `max_tokens` accepted: above the longest context any model has today.
MAX_TOKENS_LIMIT: Final = 10_000_000
# Inclusive ranges of the numeric sampling fields (OpenAI's documented ones where it has them).
NUMBER_RANGES: Final[dict[str, tuple[int | float, int | float]]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "min_p": (0, 1),
    "frequency_penalty": (-2, 2),
    "presence_penalty": (-2, 2),
    "repetition_penalty": (0, 10),
    "top_k": (-1, 1_000_000),  # -1: disabled, as vLLM spells it
    "top_logprobs": (0, 20),
    "seed": (-(2**63), 2**63 - 1),
}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """What the chat codec needs to answer: how, and under which model name."""

    model: str
    stream: bool
    include_usage: bool


def parse_chat_request(raw: bytes) -> Parsed:
    body = _decode(normalize_tools(raw))
    model = _require(body, "model", str, "a string")
    messages = _require(body, "messages", list, "an array")
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    if not all(isinstance(message, dict) for message in messages):
        raise bad_request("every entry of 'messages' must be an object", "messages")
    _check_options(body)
    stream = body.get("stream") is True
    include_usage = stream and _include_usage(body)
    prompt_tokens = estimate_prompt_tokens(messages)
    asked = _asked_max_tokens(body)
    traits = RequestTraits(
        model=model,
        has_tools=bool(body.get("tools")),
        has_media=any(_media_parts(m) for m in messages),
        prompt_tokens=prompt_tokens,
        max_tokens=asked or DEFAULT_MAX_TOKENS,
        context_tokens=prompt_tokens + (asked or 0),
    )
    provider_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    envelope = _encoder.encode({"endpoint": ENDPOINT, "body": provider_body})
    return Parsed(traits, envelope, ChatOptions(model, stream, include_usage))


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nesting too deep
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _require(body: dict[str, Any], name: str, kind: type, described: str) -> Any:
    if name not in body:
        raise bad_request(f"missing required field '{name}'", name)
    value = body[name]
    if not isinstance(value, kind) or (kind is str and not value):
        raise bad_request(f"'{name}' must be {described}", name)
    return value


def _check_options(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise bad_request("'n' must be a positive integer", "n")
    if n is not None and n > 1:
        raise bad_request("'n' greater than 1 is not supported", "n")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean", "stream")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise bad_request(f"'{name}' must be a positive integer", name)
        if value is not None and value > MAX_TOKENS_LIMIT:
            raise bad_request(f"'{name}' must be at most {MAX_TOKENS_LIMIT}", name)
    for name, (low, high) in NUMBER_RANGES.items():
        _check_number(body, name, low, high)


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise bad_request(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}", name)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _asked_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else None


def _media_parts(message: Any, types: frozenset[str] = MEDIA_PART_TYPES) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") in types)


def estimate_prompt_tokens(messages: list[Any]) -> int:
    """Text length / 4, plus 4 per message, 300 per image part and 1,500 per video part."""
    chars = sum(_text_length(m) for m in messages)
    images = sum(_media_parts(m, IMAGE_PART_TYPES) for m in messages)
    videos = sum(_media_parts(m, VIDEO_PART_TYPES) for m in messages)
    return (
        chars // 4
        + TOKENS_PER_MESSAGE * len(messages)
        + TOKENS_PER_IMAGE * images
        + TOKENS_PER_VIDEO * videos
    )


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
