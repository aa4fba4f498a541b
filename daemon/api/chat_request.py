"""A consumer's `/v1/chat/completions` body: validation, routing traits, the provider envelope.

`parse_chat_request` turns raw bytes into a `Parsed` request or raises a 400 `ApiError` naming
the field. Tool schemas are repaired first (`protocol.toolschema`), so every provider gets the
normalized body; the checks every OpenAI-shaped body shares (exact numbers, the sampling
ranges, the token limits) live in `body.py`.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.api.body import (
    DEFAULT_MAX_TOKENS,
    StreamOptions,
    asked_max_tokens,
    bad_request,
    check_options,
    decode_object,
    provider_envelope,
    require,
    wants_usage,
)
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


def parse_chat_request(raw: bytes) -> Parsed:
    body = decode_object(normalize_tools(raw))
    model = require(body, "model", str, "a string")
    messages = require(body, "messages", list, "an array")
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    if not all(isinstance(message, dict) for message in messages):
        raise bad_request("every entry of 'messages' must be an object", "messages")
    check_options(body)
    stream = body.get("stream") is True
    include_usage = wants_usage(body)
    prompt_tokens = estimate_prompt_tokens(messages)
    asked = asked_max_tokens(body)
    traits = RequestTraits(
        model=model,
        has_tools=bool(body.get("tools")),
        has_media=any(_media_parts(m) for m in messages),
        prompt_tokens=prompt_tokens,
        max_tokens=asked or DEFAULT_MAX_TOKENS,
        context_tokens=prompt_tokens + (asked or 0),
    )
    envelope = provider_envelope(ENDPOINT, body)
    return Parsed(traits, envelope, StreamOptions(model, stream, include_usage))


def _media_parts(message: Any, types: frozenset[str] = MEDIA_PART_TYPES) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and _part_type(part) in types)


def _part_type(part: dict[str, Any]) -> str | None:
    # Only a string is looked up: an unhashable `type` ([] or {}) must not raise (a 500).
    kind = part.get("type")
    return kind if isinstance(kind, str) else None


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
