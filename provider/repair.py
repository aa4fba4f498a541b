"""From a decrypted request to the exact bytes the backend gets (PROTOCOL.md §6).

The plaintext is `{"endpoint": E, "body": B}`. Before forwarding, the body is repaired for
quirks users hit with real backends:
- tool parameter schemas that chat templates choke on (`protocol.toolschema.normalize_tools`);
- an assistant message with `content: null` beside `tool_calls` (what the OpenAI SDKs send
  back after a tool call): llama-cpp-python's server concatenates the content in its template
  and answers 500, so it becomes `""`;
- `stream` forced on: the node relays server-sent events, never a single JSON answer.
A body that needed none of these is forwarded byte for byte.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from protocol.toolschema import normalize_tools
from provider.failures import RequestFailure

ENDPOINTS: Final = ("/v1/chat/completions", "/v1/completions")


class _Envelope(msgspec.Struct, frozen=True):
    endpoint: str
    body: msgspec.Raw


# Floats as Decimal so re-encoding a repaired body keeps every number's exact digits.
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_body_decoder: Final = msgspec.json.Decoder(float_hook=decimal.Decimal)
_encoder: Final = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True)
class PreparedRequest:
    endpoint: str
    body: bytes
    model: str | None
    # Characters of prompt text, for estimating prompt tokens when the backend reports none.
    prompt_chars: int

    def prompt_text(self) -> str:
        """The prompt's text, one message per line; decoded again, as only counting it needs it."""
        return "\n".join(_prompt_pieces(_body(self.body)))

    def chat(self) -> tuple[list[Any], list[Any] | None] | None:
        """A chat request's messages and tools, plainly decoded for a template; else None."""
        if self.endpoint != "/v1/chat/completions":
            return None
        body = msgspec.json.decode(self.body)  # valid: `prepare` decoded it
        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list):
            return None
        return messages, tools if isinstance(tools, list) and tools else None


def prepare(plaintext: bytes) -> PreparedRequest:
    """The request to forward; RequestFailure(400) when the plaintext is not a valid request."""
    envelope = _envelope(plaintext)
    body_bytes = normalize_tools(bytes(envelope.body))
    body = _body(body_bytes)
    if _repair(body):
        body_bytes = _encoder.encode(body)
    model = body.get("model")
    return PreparedRequest(
        endpoint=envelope.endpoint,
        body=body_bytes,
        model=model if isinstance(model, str) else None,
        prompt_chars=prompt_chars(body),
    )


def _envelope(plaintext: bytes) -> _Envelope:
    try:
        envelope = _envelope_decoder.decode(plaintext)
    except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError is a DecodeError
        raise RequestFailure(
            400, f"request is not {{endpoint, body}}: {exc}", "bad_request"
        ) from None
    if envelope.endpoint not in ENDPOINTS:
        raise RequestFailure(
            400, f"endpoint {envelope.endpoint!r} is not served by providers", "bad_request"
        )
    return envelope


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = _body_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        raise RequestFailure(400, "request body is not valid JSON", "bad_request") from None
    if not isinstance(body, dict):
        raise RequestFailure(400, "request body is not a JSON object", "bad_request")
    return body


def _repair(body: dict[str, Any]) -> bool:
    changed = _fill_tool_call_content(body.get("messages"))
    if body.get("stream") is not True:
        body["stream"] = True
        changed = True
    return changed


def _fill_tool_call_content(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    changed = False
    for message in messages:
        if (
            isinstance(message, dict)
            and message.get("role") == "assistant"
            and message.get("tool_calls")
            and message.get("content") is None
        ):
            message["content"] = ""
            changed = True
    return changed


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of text in the prompt: message contents, or the completions `prompt`."""
    return sum(len(piece) for piece in _prompt_pieces(body))


def _prompt_pieces(body: dict[str, Any]) -> list[str]:
    messages = body.get("messages")
    if isinstance(messages, list):
        return [t for m in messages if isinstance(m, dict) for t in _texts(m.get("content"))]
    return _texts(body.get("prompt"))


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [text for part in content if (text := _part_text(part))]
    return []


def _part_text(part: Any) -> str:
    if isinstance(part, str):  # a completions prompt may be a list of strings
        return part
    if isinstance(part, dict):
        text = part.get("text")
        return text if isinstance(text, str) else ""
    return ""
