"""What every OpenAI-shaped request body shares: its checks and the envelope a provider gets.

A body is a JSON object decoded with exact numbers (decimals as `Decimal`, re-encoded digit
for digit); `check_options` holds the fields chat and text completions have in common to the
ranges OpenAI documents (`NUMBER_RANGES`); each check raises a 400 `ApiError` naming the field.
`provider_envelope` is the `{"endpoint", "body"}` plaintext of PROTOCOL.md §6: the daemon
always asks providers to stream, with usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from types import UnionType
from typing import Any, Final

import msgspec

from daemon.api.errors import ApiError

# The max_tokens assumed for routing when the consumer asked for none.
DEFAULT_MAX_TOKENS: Final = 1024
# The largest `max_tokens` accepted: above the longest context any model has today.
MAX_TOKENS_LIMIT: Final = 10_000_000
# A consumer's value quoted in an error message is cut to this many characters.
ECHO_CHARS: Final = 48
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

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)
_encoder: Final = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What an OpenAI-shaped codec needs to answer: how, and under which model name."""

    model: str
    stream: bool
    include_usage: bool


def echo(value: Any) -> str:
    """A consumer's value in an error message, cut short: a huge one is never echoed whole."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + "..."


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def decode_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nesting too deep
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def require(body: dict[str, Any], name: str, kind: type | UnionType, described: str) -> Any:
    """`body[name]`, which must be a `kind` (a non-empty one for strings)."""
    if name not in body:
        raise bad_request(f"missing required field '{name}'", name)
    value = body[name]
    if not isinstance(value, kind) or (kind is str and not value):
        raise bad_request(f"'{name}' must be {described}", name)
    return value


def positive_int(body: dict[str, Any], name: str) -> int | None:
    """`body[name]` when present: a positive integer (not a boolean), or a 400."""
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise bad_request(f"'{name}' must be a positive integer", name)
    return value


def check_options(body: dict[str, Any]) -> None:
    """`n`, `stream`, `tools`, the token limits and the sampling numbers."""
    n = positive_int(body, "n")
    if n is not None and n > 1:
        raise bad_request("'n' greater than 1 is not supported", "n")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean", "stream")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    for name in ("max_tokens", "max_completion_tokens"):
        value = positive_int(body, name)
        if value is not None and value > MAX_TOKENS_LIMIT:
            raise bad_request(f"'{name}' must be at most {MAX_TOKENS_LIMIT}", name)
    for name, (low, high) in NUMBER_RANGES.items():
        check_number(body, name, low, high)


def check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise bad_request(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}", name)


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the consumer ask for the usage chunk (`stream_options.include_usage`)?"""
    options = body.get("stream_options")
    return (
        body.get("stream") is True
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def asked_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else None


def provider_envelope(endpoint: str, body: dict[str, Any]) -> bytes:
    """The plaintext sealed for each provider: `body`, streamed with usage, for `endpoint`."""
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return _encoder.encode({"endpoint": endpoint, "body": streamed})
